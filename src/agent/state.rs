//! The agent's state, read-only, on its metrics address: what it last applied and how its last
//! sync went, so that `svcproxy trace --agent`, `services --agent` and `dump --agent` see exactly
//! what the running agent believes.
//!
//! - `GET /state/snapshot`: `{"config": …, "snapshot": …}`, the configuration and the cluster
//!   state (Services, EndpointSlices, the Node, the ServiceCIDRs, as converted) of the last
//!   successful sync.
//! - `GET /state/plan`: the plan of that snapshot (computed on request: the plan is a pure
//!   function of the two, the same the backend rendered).
//! - `GET /state/sync`: the last sync's outcome, failed ones included.
//!
//! The snapshot is copied from the sync loop when asked for, between syncs: a sync pays nothing
//! for this.
//!
//! Only GET routes exist (anything else is 405): nothing here changes the agent. The metrics
//! address binds to loopback by default (`127.0.0.1:10249`); the snapshot names every Service and
//! endpoint of the cluster, so a wider binding exposes that to whoever can reach it.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::model::{ProxyConfig, Snapshot};

/// How the last sync went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncOutcome {
    /// RFC 3339, UTC.
    pub at: String,
    pub ok: bool,
    /// `full` or `partial` (successful syncs).
    pub kind: Option<String>,
    pub error: Option<String>,
    pub services: usize,
    pub endpoint_slices: usize,
    pub elements_added: usize,
    pub elements_deleted: usize,
    pub chains_changed: usize,
    pub duration_ms: f64,
}

/// What `/state/snapshot` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub config: ProxyConfig,
    /// `nftables` or `iptables`: which backend the agent programs.
    #[serde(default)]
    pub mode: String,
    pub snapshot: Snapshot,
}

/// A question for the sync loop: the snapshot it last applied.
pub type StateRequest = tokio::sync::oneshot::Sender<Option<Arc<Applied>>>;

/// The state the agent publishes. The last sync's outcome is recorded after each sync (cheap);
/// the snapshot is asked of the sync loop only when someone asks for it, so that a sync pays
/// nothing for it (a copy of a 10k-Service snapshot's maps costs milliseconds).
#[derive(Debug)]
pub struct AgentState {
    sync: Mutex<Option<SyncOutcome>>,
    ask: tokio::sync::mpsc::Sender<StateRequest>,
}

impl AgentState {
    /// The state, and the receiving end the sync loop answers.
    pub fn new() -> (Arc<AgentState>, tokio::sync::mpsc::Receiver<StateRequest>) {
        let (ask, requests) = tokio::sync::mpsc::channel(16);
        (
            Arc::new(AgentState {
                sync: Mutex::new(None),
                ask,
            }),
            requests,
        )
    }

    /// After a successful sync.
    pub fn synced(&self, outcome: SyncOutcome) {
        *self.sync.lock().expect("state lock") = Some(outcome);
    }

    /// After a failed sync: the kernel keeps the previous rules, and the state the previous
    /// snapshot.
    pub fn failed(&self, error: String, duration: Duration) {
        *self.sync.lock().expect("state lock") = Some(SyncOutcome {
            at: super::serve::rfc3339(Some(SystemTime::now())),
            ok: false,
            kind: None,
            error: Some(error),
            services: 0,
            endpoint_slices: 0,
            elements_added: 0,
            elements_deleted: 0,
            chains_changed: 0,
            duration_ms: duration.as_secs_f64() * 1e3,
        });
    }

    /// The snapshot last applied, from the sync loop (which answers between syncs).
    async fn current(&self) -> Option<Arc<Applied>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ask.send(tx).await.ok()?;
        tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .ok()?
            .ok()
            .flatten()
    }
}

fn json(body: String) -> axum::response::Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn not_yet() -> axum::response::Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "no successful sync yet\n".to_string(),
    )
        .into_response()
}

/// The read-only routes, to merge into the metrics server.
pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route(
            "/state/snapshot",
            get(|State(s): State<Arc<AgentState>>| async move {
                match s.current().await {
                    Some(a) => json(serde_json::to_string(&*a).expect("serializes")),
                    None => not_yet(),
                }
            }),
        )
        .route(
            "/state/plan",
            get(|State(s): State<Arc<AgentState>>| async move {
                let Some(a) = s.current().await else {
                    return not_yet();
                };
                let body = tokio::task::spawn_blocking(move || {
                    let plan = crate::plan::plan(&a.snapshot, &a.config);
                    serde_json::to_string(&plan).expect("serializes")
                })
                .await
                .expect("plan task");
                json(body)
            }),
        )
        .route(
            "/state/sync",
            get(|State(s): State<Arc<AgentState>>| async move {
                match s.sync.lock().expect("state lock").clone() {
                    Some(o) => json(serde_json::to_string(&o).expect("serializes")),
                    None => not_yet(),
                }
            }),
        )
        .with_state(state)
}

/// Why the agent's state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("--agent {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--agent {addr}: {status}")]
    Status { addr: String, status: String },
    #[error("--agent {addr}: not the agent's state: {source}")]
    Json {
        addr: String,
        #[source]
        source: serde_json::Error,
    },
}

/// `GET path` from `addr` (HTTP/1.0, so the answer ends with the connection): the body.
pub fn get_path(addr: &str, path: &str) -> Result<Vec<u8>, FetchError> {
    let io = |source| FetchError::Io {
        addr: addr.to_string(),
        source,
    };
    let target = addr
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| io(std::io::Error::other("no address")))?;
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(10)).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(io)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(io)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io(std::io::Error::other("no HTTP answer")))?;
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status = head.lines().next().unwrap_or_default().to_string();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(FetchError::Status {
            addr: addr.to_string(),
            status,
        });
    }
    Ok(answer[split + 4..].to_vec())
}

/// Reads a running agent's last applied snapshot, its configuration and its mode.
pub fn fetch(addr: &str) -> Result<Applied, FetchError> {
    let body = get_path(addr, "/state/snapshot")?;
    serde_json::from_slice(&body).map_err(|source| FetchError::Json {
        addr: addr.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_survives_the_round_trip() {
        let mut s = crate::synthetic::cluster(20, 3);
        s.node.pod_cidrs = vec!["10.244.0.0/24".parse().unwrap()];
        s.service_cidrs = vec!["10.96.0.0/12".parse().unwrap()];
        let config = ProxyConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            nodeport_addresses: crate::model::NodePortAddresses::Cidrs(vec![
                "192.168.0.0/16".parse().unwrap(),
            ]),
            ..ProxyConfig::default()
        };
        let a = Applied {
            config,
            mode: "nftables".into(),
            snapshot: s,
        };
        let text = serde_json::to_string(&a).unwrap();
        let back: Applied = serde_json::from_str(&text).unwrap();
        assert_eq!(back, a);
        // The plan serializes too.
        let plan = crate::plan::plan(&a.snapshot, &a.config);
        assert!(serde_json::to_string(&plan).unwrap().contains("10.96.0.1"));
    }
}
