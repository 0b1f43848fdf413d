//! The agent's HTTP endpoints, on kube-proxy's contract: `/healthz` and `/livez` on the healthz
//! address, `/metrics` on the metrics address, and one health check server per LoadBalancer
//! Service with externalTrafficPolicy Local, on its healthCheckNodePort.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::metrics::Metrics;
use crate::model::ObjectRef;

/// When the rules were last brought up to date, and when a change was last queued.
pub struct Health {
    timeout: Duration,
    state: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl Health {
    /// `timeout`: how long a queued change may wait for a sync before the proxy is unhealthy
    /// (kube-proxy: twice the sync period).
    pub fn new(timeout: Duration) -> Health {
        Health {
            timeout,
            state: Mutex::new((None, None)),
        }
    }

    /// A change is waiting for a sync (the first one since the last sync counts).
    pub fn queued(&self, at: SystemTime) {
        let mut s = self.state.lock().unwrap();
        let pending = matches!((s.0, s.1), (Some(updated), Some(queued)) if queued > updated)
            || (s.0.is_none() && s.1.is_some());
        if !pending {
            s.1 = Some(at);
        }
    }

    /// The rules were synced.
    pub fn updated(&self, at: SystemTime) {
        self.state.lock().unwrap().0 = Some(at);
    }

    /// Healthy unless a queued change has waited longer than the timeout.
    pub fn check(&self, now: SystemTime) -> (bool, Option<SystemTime>) {
        let (updated, queued) = *self.state.lock().unwrap();
        let waiting = match (updated, queued) {
            (_, None) => None,
            (None, Some(q)) => Some(q),
            (Some(u), Some(q)) if q > u => Some(q),
            _ => None,
        };
        let late =
            waiting.is_some_and(|q| now.duration_since(q).unwrap_or_default() > self.timeout);
        (!late, updated)
    }
}

/// RFC 3339 in UTC, as Kubernetes writes times (`2026-11-22T01:02:03Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn health_response(health: &Health, healthz: bool) -> Response {
    let now = SystemTime::now();
    let (ok, updated) = health.check(now);
    let mut body = serde_json::json!({
        "lastUpdated": updated.map(rfc3339).unwrap_or_default(),
        "currentTime": rfc3339(now),
    });
    if healthz {
        body["nodeEligible"] = serde_json::json!(true);
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Serves `/healthz` and `/livez` until `stop` turns true.
pub async fn serve_health(listener: TcpListener, health: Arc<Health>, stop: watch::Receiver<bool>) {
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(h): State<Arc<Health>>| async move { health_response(&h, true) }),
        )
        .route(
            "/livez",
            get(|State(h): State<Arc<Health>>| async move { health_response(&h, false) }),
        )
        .with_state(health);
    serve(listener, app, stop).await;
}

/// Serves `/metrics` until `stop` turns true.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }),
        )
        .with_state(metrics);
    serve(listener, app, stop).await;
}

async fn serve(listener: TcpListener, app: Router, mut stop: watch::Receiver<bool>) {
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!("HTTP server stopped: {e}");
    }
}

/// One health check server: the Service it answers for and its current local endpoint count.
struct HealthCheck {
    service: ObjectRef,
    local_endpoints: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
}

/// The healthCheckNodePort servers, opened and closed as Services come and go.
pub struct HealthCheckServers {
    address: IpAddr,
    servers: Mutex<HashMap<u16, HealthCheck>>,
}

impl Default for HealthCheckServers {
    fn default() -> Self {
        HealthCheckServers {
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            servers: Mutex::new(HashMap::new()),
        }
    }
}

impl HealthCheckServers {
    /// Servers listening on `address` (kube-proxy: all addresses).
    pub fn new(address: IpAddr) -> HealthCheckServers {
        HealthCheckServers {
            address,
            servers: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the servers match `wanted` (port → Service and its local endpoint count).
    pub async fn update(&self, wanted: &BTreeMap<u16, (ObjectRef, usize)>) {
        let mut to_start = Vec::new();
        {
            let mut servers = self.servers.lock().unwrap();
            servers.retain(|port, hc| {
                let keep = wanted.get(port).is_some_and(|(svc, _)| *svc == hc.service);
                if !keep {
                    let _ = hc.stop.send(true);
                    tracing::info!(port, service = %hc.service, "health check server closed");
                }
                keep
            });
            for (port, (svc, n)) in wanted {
                match servers.get(port) {
                    Some(hc) => hc.local_endpoints.store(*n, Ordering::Relaxed),
                    None => to_start.push((*port, svc.clone(), *n)),
                }
            }
        }
        for (port, service, n) in to_start {
            let listener = match TcpListener::bind(SocketAddr::new(self.address, port)).await {
                Ok(l) => l,
                Err(e) => {
                    // Retried at the next sync.
                    tracing::warn!(port, %service, "cannot open the health check port: {e}");
                    continue;
                }
            };
            let local_endpoints = Arc::new(AtomicUsize::new(n));
            let (stop, stop_rx) = watch::channel(false);
            let state = (service.clone(), local_endpoints.clone());
            let app = Router::new()
                .fallback(get(
                    |State((svc, n)): State<(ObjectRef, Arc<AtomicUsize>)>| async move {
                        let n = n.load(Ordering::Relaxed);
                        let body = serde_json::json!({
                            "service": {"namespace": svc.namespace, "name": svc.name},
                            "localEndpoints": n,
                            "serviceProxyHealthy": true,
                        });
                        let status = if n > 0 {
                            StatusCode::OK
                        } else {
                            StatusCode::SERVICE_UNAVAILABLE
                        };
                        (
                            status,
                            [
                                (
                                    header::CONTENT_TYPE.as_str(),
                                    "application/json".to_string(),
                                ),
                                ("X-Load-Balancing-Endpoint-Weight", n.to_string()),
                            ],
                            body.to_string(),
                        )
                    },
                ))
                .with_state(state);
            tokio::spawn(serve(listener, app, stop_rx));
            tracing::info!(port, %service, "health check server opened");
            self.servers.lock().unwrap().insert(
                port,
                HealthCheck {
                    service,
                    local_endpoints,
                    stop,
                },
            );
        }
    }

    /// The ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self.servers.lock().unwrap().keys().copied().collect();
        p.sort();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_309_323)),
            "2026-11-22T01:02:03Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn health_follows_queued_changes() {
        let h = Health::new(Duration::from_secs(10));
        let t0 = UNIX_EPOCH + Duration::from_secs(1000);
        assert!(h.check(t0).0, "nothing queued yet");
        h.queued(t0);
        assert!(h.check(t0 + Duration::from_secs(5)).0, "queued, not late");
        assert!(!h.check(t0 + Duration::from_secs(11)).0, "queued and late");
        h.updated(t0 + Duration::from_secs(12));
        assert!(h.check(t0 + Duration::from_secs(100)).0, "synced since");
        h.queued(t0 + Duration::from_secs(200));
        h.queued(t0 + Duration::from_secs(209));
        assert!(
            !h.check(t0 + Duration::from_secs(211)).0,
            "the first queued change counts"
        );
    }
}
