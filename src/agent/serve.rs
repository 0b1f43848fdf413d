//! The agent's HTTP endpoints, on kube-proxy's contract: `/healthz` and `/livez` on the healthz
//! address, `/metrics` on the metrics address, and one health check server per LoadBalancer
//! Service with externalTrafficPolicy Local, on its healthCheckNodePort.
//!
//! The health rules are kube-proxy's (`pkg/proxy/healthcheck/proxy_health.go`), per IP family:
//! a family is unhealthy when a change queued for it has waited `timeout` or longer without a
//! successful sync; the proxy is healthy when every family is. `/healthz` also fails while the
//! Node is going away (deleted, or tainted by the cluster autoscaler), so that load balancers
//! drain the node; `/livez` does not, so that the kubelet does not restart a draining proxy.
//! svcproxy programs both families in one sync, so both are queued and updated together.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use super::metrics::{Metrics, family_label};
use crate::model::{IpFamily, NodeInfo, NodePortAddresses, ObjectRef, Snapshot};

/// kube-proxy's default `syncPeriod`: how often it retries a failed sync, and the unit of its
/// health timeout.
pub const KUBE_PROXY_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// How long a queued change may wait for a successful sync before the proxy is unhealthy.
///
/// kube-proxy uses twice its `syncPeriod` (60 s by default), the period at which it retries a
/// failed sync: one retry may fail before it reports itself unhealthy. svcproxy's
/// `--sync-period` is only its full-resync period (1 h by default) and a failed sync is retried
/// with a backoff of at most 30 s whatever that period, so the timeout is twice the shorter of
/// the two: kube-proxy's 60 s with the defaults, shorter with a shorter `syncPeriod` (as in
/// kube-proxy), never hours because full resyncs are rare.
pub fn health_timeout(sync_period: Duration) -> Duration {
    sync_period.min(KUBE_PROXY_SYNC_PERIOD) * 2
}

/// One family's sync state (kube-proxy's `lastUpdatedMap` and `oldestPendingQueuedMap`).
#[derive(Debug, Clone, Copy, Default)]
struct FamilyState {
    /// The last successful sync (or the start of the sync loop).
    last_updated: Option<SystemTime>,
    /// The oldest change queued since then.
    oldest_queued: Option<SystemTime>,
}

/// The proxy's health, as kube-proxy's health server tracks it.
pub struct Health {
    timeout: Duration,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    families: [FamilyState; 2],
    /// Whether the Node is eligible for traffic; `None` until the agent has seen its Node (as
    /// kube-proxy, which has no Node then and answers `nodeEligible: false`).
    node_eligible: Option<bool>,
}

/// One family's health as `/healthz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyHealth {
    pub family: IpFamily,
    pub last_updated: SystemTime,
    pub healthy: bool,
}

/// The proxy's health at one moment (kube-proxy's `ProxyHealth`, without the Node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHealth {
    /// Every family that has synced (or started its sync loop) is healthy.
    pub healthy: bool,
    /// The most recent sync of any family (`None`: none yet).
    pub last_updated: Option<SystemTime>,
    /// The families that have synced or started, IPv4 first.
    pub families: Vec<FamilyHealth>,
}

impl Health {
    /// `timeout`: see [`health_timeout`]. Nothing has synced yet: healthy, as kube-proxy is
    /// while it starts.
    pub fn new(timeout: Duration) -> Health {
        Health {
            timeout,
            state: Mutex::new(HealthState::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HealthState) -> T) -> T {
        // A panic elsewhere while holding the lock leaves plain data: keep using it.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    /// A change is waiting for a sync, in every family (only the oldest waiting one counts).
    pub fn queued(&self, at: SystemTime) {
        self.with(|s| {
            for f in &mut s.families {
                f.oldest_queued.get_or_insert(at);
            }
        });
    }

    /// Every family's rules were synced (also called when the sync loop starts, as kube-proxy
    /// does "in case the first sync never succeeds": a change queued then and never synced
    /// makes the proxy unhealthy after the timeout).
    pub fn updated(&self, at: SystemTime) {
        self.with(|s| {
            for f in &mut s.families {
                *f = FamilyState {
                    last_updated: Some(at),
                    oldest_queued: None,
                };
            }
        });
    }

    /// What the agent knows of its Node: `None` when it has not seen it (or it is gone),
    /// else whether the Node is eligible for traffic ([`NodeInfo::eligible`]).
    pub fn node(&self, eligible: Option<bool>) {
        self.with(|s| s.node_eligible = eligible);
    }

    /// Whether the Node is eligible for traffic (false while it is unknown).
    pub fn node_eligible(&self) -> bool {
        self.with(|s| s.node_eligible.unwrap_or(false))
    }

    /// The proxy's health at `now`. A family that has never synced is left out (kube-proxy's
    /// rule: healthy while starting); one with a change queued for `timeout` or longer is
    /// unhealthy.
    pub fn health(&self, now: SystemTime) -> ProxyHealth {
        let families: Vec<FamilyState> = self.with(|s| s.families.to_vec());
        let mut out = ProxyHealth {
            healthy: true,
            last_updated: None,
            families: Vec::new(),
        };
        for (family, state) in IpFamily::ALL.into_iter().zip(families) {
            let Some(last_updated) = state.last_updated else {
                continue;
            };
            out.last_updated = out.last_updated.max(Some(last_updated));
            let late = state.oldest_queued.is_some_and(|q| {
                // A clock stepped backwards makes the wait zero, not negative.
                now.duration_since(q).unwrap_or_default() >= self.timeout
            });
            out.healthy &= !late;
            out.families.push(FamilyHealth {
                family,
                last_updated,
                healthy: !late,
            });
        }
        out
    }
}

/// RFC 3339 in UTC with the fraction of a second Go prints (`time.RFC3339Nano`: trailing zeros
/// dropped, none when whole), as kube-proxy's JSON writes times: `2026-11-22T01:02:03.5Z`.
/// `None` is Go's zero time, `0001-01-01T00:00:00Z`.
pub fn rfc3339(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01T00:00:00Z".to_string();
    };
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
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
    let nanos = since.subsec_nanos();
    let fraction = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}").trim_end_matches('0').to_string()
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{fraction}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One family in the `/healthz` and `/livez` bodies (kube-proxy's `ProxierHealth`).
#[derive(Serialize)]
struct FamilyBody {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
    healthy: bool,
}

/// The `/healthz` and `/livez` body: kube-proxy's `ProxyHealth` as Go's `encoding/json` writes
/// it (these fields, in this order; `nodeEligible` on `/healthz` only; `status` keyed
/// `IPv4`/`IPv6`, left out while empty).
#[derive(Serialize)]
struct HealthBody {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
    #[serde(rename = "currentTime")]
    current_time: String,
    #[serde(rename = "nodeEligible", skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, FamilyBody>,
}

/// `/healthz` (`node_eligible: Some`) or `/livez` (`None`) at `now`: the status code and body.
///
/// As kube-proxy: 200 when healthy (and, for `/healthz`, the Node eligible), else 503. A
/// healthy answer reports `lastUpdated` as the current time (kube-proxy keeps that for
/// compatibility with releases where it meant "the sync loop ran"); an unhealthy one the last
/// sync. The body's `healthy` is the proxy's own health, without the Node.
pub fn health_answer(
    health: &ProxyHealth,
    node_eligible: Option<bool>,
    now: SystemTime,
) -> (StatusCode, String) {
    let ok = health.healthy && node_eligible.unwrap_or(true);
    let body = HealthBody {
        last_updated: rfc3339(if ok { Some(now) } else { health.last_updated }),
        current_time: rfc3339(Some(now)),
        node_eligible,
        healthy: health.healthy,
        status: health
            .families
            .iter()
            .map(|f| {
                (
                    family_label(f.family),
                    FamilyBody {
                        last_updated: rfc3339(Some(f.last_updated)),
                        healthy: f.healthy,
                    },
                )
            })
            .collect(),
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(&body).unwrap_or_default();
    (status, body)
}

const NOSNIFF: (HeaderName, HeaderValue) = (
    header::X_CONTENT_TYPE_OPTIONS,
    HeaderValue::from_static("nosniff"),
);
const JSON: (HeaderName, HeaderValue) = (
    header::CONTENT_TYPE,
    HeaderValue::from_static("application/json"),
);

/// The state of the healthz server's handlers.
#[derive(Clone)]
struct HealthServer {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

fn health_response(server: &HealthServer, healthz: bool) -> Response {
    let now = SystemTime::now();
    let node = healthz.then(|| server.health.node_eligible());
    let (status, body) = health_answer(&server.health.health(now), node, now);
    let counter = if healthz {
        &server.metrics.healthz
    } else {
        &server.metrics.livez
    };
    counter
        .get_or_create(&vec![("code".to_string(), status.as_u16().to_string())])
        .inc();
    (status, [JSON, NOSNIFF], body).into_response()
}

/// Serves `/healthz` and `/livez` until `stop` turns true.
pub async fn serve_health(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(s): State<HealthServer>| async move { health_response(&s, true) }),
        )
        .route(
            "/livez",
            get(|State(s): State<HealthServer>| async move { health_response(&s, false) }),
        )
        .with_state(HealthServer { health, metrics });
    serve(listener, app, stop).await;
}

/// Serves `/metrics` until `stop` turns true.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    state: Arc<super::state::AgentState>,
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
        .with_state(metrics)
        .merge(super::state::router(state));
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

/// Listens on `address` as kube-proxy's Go servers do: an unspecified address (`0.0.0.0` or
/// `::`) means every address of both families (one IPv6 socket that also accepts IPv4), or
/// IPv4 alone where the host has no IPv6.
pub async fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    if !address.ip().is_unspecified() {
        return TcpListener::bind(address).await;
    }
    let any6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), address.port());
    match bind_v6(any6, false) {
        Ok(l) => Ok(l),
        Err(e) if no_ipv6(&e) => {
            TcpListener::bind(SocketAddr::new(
                Ipv4Addr::UNSPECIFIED.into(),
                address.port(),
            ))
            .await
        }
        Err(e) => Err(e),
    }
}

/// Whether `e` says that the host has no IPv6 at all.
fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
    )
}

/// An IPv6 listener; `v6_only` false also accepts IPv4 (as v4-mapped addresses).
fn bind_v6(address: SocketAddr, v6_only: bool) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let socket = TcpSocket::new_v6()?;
    socket.set_reuseaddr(true)?;
    let on = libc::c_int::from(v6_only);
    // SAFETY: setsockopt on a socket this function owns, with a pointer to a live c_int and
    // its size.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(address)?;
    socket.listen(1024)
}

/// The addresses of the host's interfaces (`getifaddrs`).
fn interface_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed; `ifa_addr`
        // is null or points to a sockaddr whose family says its real type.
        unsafe {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let a = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let a = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// Where health check node ports listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckAddresses {
    /// kube-proxy's addresses, from `nodePortAddresses`.
    NodePorts(NodePortAddresses),
    /// Only this address (tests).
    Only(IpAddr),
}

fn unspecified(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => Ipv4Addr::UNSPECIFIED.into(),
        IpFamily::V6 => Ipv6Addr::UNSPECIFIED.into(),
    }
}

impl HealthCheckAddresses {
    /// The addresses of `family` a health check server listens on, as kube-proxy chooses them
    /// (`newServiceHealthServer`): every address when `nodePortAddresses` matches all (unset,
    /// a zero CIDR, or no CIDR of this family); else the node's addresses it selects, from
    /// the interfaces (`local`) for CIDRs, the node's primary address for `primary`.
    pub fn of_family(
        &self,
        family: IpFamily,
        node: &NodeInfo,
        local: &dyn Fn() -> std::io::Result<Vec<IpAddr>>,
    ) -> Vec<IpAddr> {
        match self {
            HealthCheckAddresses::Only(ip) if IpFamily::of(ip) == family => vec![*ip],
            HealthCheckAddresses::Only(_) => Vec::new(),
            HealthCheckAddresses::NodePorts(NodePortAddresses::All) => vec![unspecified(family)],
            HealthCheckAddresses::NodePorts(NodePortAddresses::Primary) => {
                match node.primary(family).filter(|ip| !ip.is_loopback()) {
                    Some(ip) => vec![ip],
                    None => vec![unspecified(family)],
                }
            }
            HealthCheckAddresses::NodePorts(NodePortAddresses::Cidrs(cidrs)) => {
                let mine: Vec<_> = cidrs
                    .iter()
                    .filter(|c| IpFamily::of_net(c) == family)
                    .collect();
                if mine.is_empty() || mine.iter().any(|c| c.prefix_len() == 0) {
                    return vec![unspecified(family)];
                }
                match local() {
                    Ok(addrs) => {
                        let set: BTreeSet<IpAddr> = addrs
                            .into_iter()
                            .filter(|a| mine.iter().any(|c| c.contains(a)))
                            .collect();
                        set.into_iter().collect()
                    }
                    Err(e) => {
                        // kube-proxy does the same: listen everywhere rather than nowhere.
                        tracing::warn!(
                            "cannot list the interface addresses, health check ports listen on all addresses: {e}"
                        );
                        vec![unspecified(family)]
                    }
                }
            }
        }
    }
}

/// What one health check node port answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckWant {
    pub service: ObjectRef,
    /// The Service's families (those of its ClusterIPs), each with the number of its ready
    /// endpoints on this node.
    pub local_ready: BTreeMap<IpFamily, usize>,
}

/// The health check node ports this node must answer, with each Service's ready local
/// endpoints per family.
///
/// As kube-proxy (`EndpointsMap.LocalReadyEndpoints`): only *ready* endpoints count, so a node
/// whose only local endpoint is serving but terminating answers 503 and the load balancer
/// drains it, though the endpoint still gets traffic; an endpoint is counted once per address,
/// whatever its ports; slices without ports give no endpoints.
pub fn health_check_ports(snapshot: &Snapshot) -> BTreeMap<u16, HealthCheckWant> {
    let node = snapshot.node.name.as_str();
    let mut ready: BTreeMap<&ObjectRef, BTreeSet<IpAddr>> = BTreeMap::new();
    for slice in snapshot.slices.values().filter(|s| !s.ports.is_empty()) {
        let set = ready.entry(&slice.service).or_default();
        set.extend(
            slice
                .endpoints
                .iter()
                .filter(|e| e.ready && !node.is_empty() && e.node_name.as_deref() == Some(node))
                .map(|e| e.address),
        );
    }
    snapshot
        .services
        .values()
        .filter_map(|s| {
            let port = s.health_check_node_port?;
            let ips = ready.get(&s.id);
            let local_ready = s
                .cluster_ips
                .iter()
                .map(|ip| {
                    let family = IpFamily::of(ip);
                    let n = ips.map_or(0, |set| {
                        set.iter().filter(|a| IpFamily::of(a) == family).count()
                    });
                    (family, n)
                })
                .collect();
            Some((
                port,
                HealthCheckWant {
                    service: s.id.clone(),
                    local_ready,
                },
            ))
        })
        .collect()
}

/// A health check answer, exactly as kube-proxy's (`hcHandler`): 200 when the Service has
/// ready endpoints on this node and the proxy is healthy, else 503; the count also in
/// `X-Load-Balancing-Endpoint-Weight`; the body indented with tabs as kube-proxy prints it.
pub fn health_check_answer(
    service: &ObjectRef,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> (StatusCode, String) {
    let status = if local_endpoints != 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quote(&service.namespace),
        quote(&service.name),
    );
    (status, body)
}

/// The state of one health check listener: its Service, its family's count, the proxy's health.
#[derive(Clone)]
struct HealthCheckState {
    service: ObjectRef,
    local_endpoints: Arc<AtomicUsize>,
    health: Arc<Health>,
}

async fn health_check(State(s): State<HealthCheckState>) -> Response {
    let n = s.local_endpoints.load(Ordering::Relaxed);
    let healthy = s.health.health(SystemTime::now()).healthy;
    let (status, body) = health_check_answer(&s.service, n, healthy);
    let weight = HeaderValue::from(n);
    (
        status,
        [
            JSON,
            NOSNIFF,
            (
                HeaderName::from_static("x-load-balancing-endpoint-weight"),
                weight,
            ),
        ],
        body,
    )
        .into_response()
}

/// One health check server: the Service it answers for, where it listens, its counts.
struct HealthCheck {
    service: ObjectRef,
    addresses: Vec<SocketAddr>,
    counts: BTreeMap<IpFamily, Arc<AtomicUsize>>,
    stop: watch::Sender<bool>,
}

/// The healthCheckNodePort servers, opened and closed as Services come and go.
pub struct HealthCheckServers {
    addresses: HealthCheckAddresses,
    health: Arc<Health>,
    servers: Mutex<HashMap<u16, HealthCheck>>,
}

impl HealthCheckServers {
    /// Servers on `addresses`, answering with the proxy's `health`.
    pub fn new(addresses: HealthCheckAddresses, health: Arc<Health>) -> HealthCheckServers {
        HealthCheckServers {
            addresses,
            health,
            servers: Mutex::new(HashMap::new()),
        }
    }

    /// Where the server for `want` listens, per family of its Service.
    fn addresses_for(
        &self,
        port: u16,
        want: &HealthCheckWant,
        node: &NodeInfo,
        local: &dyn Fn() -> std::io::Result<Vec<IpAddr>>,
    ) -> Vec<(IpFamily, SocketAddr)> {
        let mut out = Vec::new();
        for family in want.local_ready.keys() {
            for ip in self.addresses.of_family(*family, node, local) {
                out.push((*family, SocketAddr::new(ip, port)));
            }
        }
        out
    }

    /// Makes the servers match `wanted` (see [`health_check_ports`]), listening where
    /// [`HealthCheckAddresses::of_family`] says for `node`. A server whose Service or
    /// addresses changed is reopened; one that cannot listen is retried at the next sync.
    pub async fn update(&self, node: &NodeInfo, wanted: &BTreeMap<u16, HealthCheckWant>) {
        // The interface addresses, read once per update and only if the CIDRs need them.
        let interfaces = std::sync::OnceLock::new();
        let local = || -> std::io::Result<Vec<IpAddr>> {
            match interfaces.get_or_init(|| interface_addresses().map_err(|e| e.to_string())) {
                Ok(a) => Ok(a.clone()),
                Err(e) => Err(std::io::Error::other(e.clone())),
            }
        };
        let mut to_start = Vec::new();
        {
            let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
            servers.retain(|port, hc| {
                let keep = wanted.get(port).is_some_and(|w| {
                    w.service == hc.service
                        && self
                            .addresses_for(*port, w, node, &local)
                            .into_iter()
                            .map(|(_, a)| a)
                            .eq(hc.addresses.iter().copied())
                });
                if !keep {
                    let _ = hc.stop.send(true);
                    tracing::info!(port, service = %hc.service, "health check server closed");
                }
                keep
            });
            for (port, want) in wanted {
                match servers.get(port) {
                    Some(hc) => {
                        for (family, n) in &want.local_ready {
                            if let Some(c) = hc.counts.get(family) {
                                c.store(*n, Ordering::Relaxed);
                            }
                        }
                    }
                    None => to_start.push((*port, want.clone())),
                }
            }
        }
        for (port, want) in to_start {
            let addresses = self.addresses_for(port, &want, node, &local);
            // All or nothing, as kube-proxy: a port half open would look like a healthy node
            // to some probes only.
            let mut listeners = Vec::new();
            for (family, address) in &addresses {
                let bound = if address.is_ipv6() && address.ip().is_unspecified() {
                    bind_v6(*address, true)
                } else {
                    TcpListener::bind(address).await
                };
                match bound {
                    Ok(l) => listeners.push((*family, l)),
                    Err(e) if address.ip().is_unspecified() && address.is_ipv6() && no_ipv6(&e) => {
                        tracing::debug!(port, "no IPv6 on this host: health check on IPv4 only");
                    }
                    Err(e) => {
                        tracing::warn!(
                            port, service = %want.service, %address,
                            "cannot open the health check port (retried at the next sync): {e}"
                        );
                        listeners.clear();
                        break;
                    }
                }
            }
            if listeners.is_empty() {
                continue;
            }
            let counts: BTreeMap<IpFamily, Arc<AtomicUsize>> = want
                .local_ready
                .iter()
                .map(|(f, n)| (*f, Arc::new(AtomicUsize::new(*n))))
                .collect();
            let (stop, stop_rx) = watch::channel(false);
            for (family, listener) in listeners {
                let state = HealthCheckState {
                    service: want.service.clone(),
                    local_endpoints: counts[&family].clone(),
                    health: self.health.clone(),
                };
                let app = Router::new().fallback(health_check).with_state(state);
                tokio::spawn(serve(listener, app, stop_rx.clone()));
            }
            tracing::info!(port, service = %want.service, "health check server opened");
            self.servers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    port,
                    HealthCheck {
                        service: want.service,
                        addresses: addresses.into_iter().map(|(_, a)| a).collect(),
                        counts,
                        stop,
                    },
                );
        }
    }

    /// The ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let mut p: Vec<u16> = servers.keys().copied().collect();
        p.sort();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::Converted;
    use serde_json::{Value, json};

    const S: Duration = Duration::from_secs(1);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A snapshot of node-a from API objects (through the real conversion).
    fn snapshot(objects: &[Value]) -> Snapshot {
        let mut c = Converted::default();
        for o in objects {
            let skipped = match o["kind"].as_str() {
                Some("Service") => c.add_service(&serde_json::from_value(o.clone()).unwrap()),
                Some("EndpointSlice") => c.add_slice(&serde_json::from_value(o.clone()).unwrap()),
                k => panic!("kind {k:?}"),
            };
            assert!(skipped.is_empty(), "{skipped:?}");
        }
        Snapshot {
            services: c.services,
            slices: c.slices,
            node: NodeInfo {
                name: "node-a".into(),
                ..NodeInfo::default()
            },
            service_cidrs: Vec::new(),
        }
    }

    fn lb_service(name: &str, cluster_ips: &[&str], hcnp: u16) -> Value {
        json!({"kind": "Service", "metadata": {"name": name, "namespace": "ns"},
               "spec": {"type": "LoadBalancer", "clusterIP": cluster_ips[0], "clusterIPs": cluster_ips,
                        "externalTrafficPolicy": "Local", "healthCheckNodePort": hcnp,
                        "ports": [{"name": "http", "port": 80, "nodePort": 30080}, {"name": "https", "port": 443, "nodePort": 30443}]}})
    }

    /// `endpoints`: (address, ready, serving, terminating, node).
    fn slice(
        name: &str,
        service: &str,
        family: &str,
        endpoints: &[(&str, bool, bool, bool, &str)],
    ) -> Value {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|(ip, ready, serving, terminating, node)| {
                json!({"addresses": [ip], "nodeName": node,
                       "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
            })
            .collect();
        json!({"kind": "EndpointSlice", "metadata": {"name": name, "namespace": "ns",
                   "labels": {"kubernetes.io/service-name": service}},
               "addressType": family,
               "ports": [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}],
               "endpoints": eps})
    }

    #[test]
    fn the_health_timeout_is_kube_proxys_whatever_the_full_resync_period() {
        assert_eq!(health_timeout(Duration::from_secs(3600)), 60 * S);
        assert_eq!(health_timeout(30 * S), 60 * S);
        assert_eq!(health_timeout(10 * S), 20 * S);
        assert_eq!(health_timeout(Duration::MAX), 60 * S);
    }

    #[test]
    fn health_is_kube_proxys_rule_with_explicit_times() {
        let h = Health::new(60 * S);
        // Before the sync loop starts: no family, healthy.
        let before = h.health(at(1000));
        assert!(before.healthy && before.families.is_empty() && before.last_updated.is_none());
        // A change queued before the loop started does not count either (kube-proxy only
        // judges families that have synced or started).
        h.queued(at(1000));
        assert!(h.health(at(5000)).healthy);
        // The loop starts: that counts as an update, and clears what was queued.
        h.updated(at(1000));
        assert!(h.health(at(5000)).healthy, "nothing queued since the start");
        h.queued(at(1010));
        h.queued(at(1050));
        assert!(h.health(at(1069)).healthy, "queued 59 s ago: not late");
        let late = h.health(at(1070));
        assert!(!late.healthy, "the oldest change waited 60 s: late");
        assert_eq!(late.last_updated, Some(at(1000)));
        assert!(late.families.iter().all(|f| !f.healthy));
        assert_eq!(late.families.len(), 2);
        // A successful sync makes it healthy again at once.
        h.updated(at(1080));
        let ok = h.health(at(1080));
        assert!(ok.healthy);
        assert_eq!(ok.last_updated, Some(at(1080)));
        // A clock stepped back does not make a negative wait.
        h.queued(at(2000));
        assert!(h.health(at(1990)).healthy);
    }

    #[test]
    fn node_eligibility() {
        let h = Health::new(60 * S);
        assert!(
            !h.node_eligible(),
            "unknown Node: not eligible (kube-proxy: no Node)"
        );
        h.node(Some(true));
        assert!(h.node_eligible());
        h.node(Some(false));
        assert!(!h.node_eligible());
        let node = |v: Value| crate::convert::node(&serde_json::from_value(v).unwrap()).0;
        let plain = node(json!({"metadata": {"name": "a"}}));
        assert!(plain.eligible());
        let other = node(
            json!({"metadata": {"name": "a"}, "spec": {"taints": [{"key": "other", "effect": "NoSchedule"}]}}),
        );
        assert!(other.eligible(), "only the autoscaler's taint counts");
        let tainted = node(json!({"metadata": {"name": "a"}, "spec": {"taints": [
            {"key": "other", "effect": "NoSchedule"},
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]}}));
        assert!(tainted.autoscaler_removing && !tainted.eligible());
        let deleting =
            node(json!({"metadata": {"name": "a", "deletionTimestamp": "2026-11-22T01:02:03Z"}}));
        assert!(deleting.deleting && !deleting.eligible());
    }

    #[test]
    fn rfc3339_as_go_prints_times() {
        assert_eq!(rfc3339(None), "0001-01-01T00:00:00Z");
        assert_eq!(rfc3339(Some(UNIX_EPOCH)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(Some(at(1_795_309_323))), "2026-11-22T01:02:03Z");
        assert_eq!(rfc3339(Some(at(951_782_400))), "2000-02-29T00:00:00Z");
        assert_eq!(
            rfc3339(Some(at(1_795_309_323) + Duration::from_millis(500))),
            "2026-11-22T01:02:03.5Z"
        );
        assert_eq!(
            rfc3339(Some(at(1_795_309_323) + Duration::from_nanos(123_456_780))),
            "2026-11-22T01:02:03.12345678Z"
        );
    }

    #[test]
    fn healthz_and_livez_answers_are_kube_proxys() {
        let h = Health::new(60 * S);
        let t = 1_795_309_323;
        // Before the loop starts: healthy, no status; /healthz needs the Node.
        let (code, body) = health_answer(&h.health(at(t)), None, at(t));
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"lastUpdated":"2026-11-22T01:02:03Z","currentTime":"2026-11-22T01:02:03Z","healthy":true}"#
        );
        let (code, body) = health_answer(&h.health(at(t)), Some(false), at(t));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            r#"{"lastUpdated":"0001-01-01T00:00:00Z","currentTime":"2026-11-22T01:02:03Z","nodeEligible":false,"healthy":true}"#
        );
        h.updated(at(t));
        let (code, body) = health_answer(&h.health(at(t + 5)), Some(true), at(t + 5));
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            concat!(
                r#"{"lastUpdated":"2026-11-22T01:02:08Z","currentTime":"2026-11-22T01:02:08Z","nodeEligible":true,"healthy":true,"#,
                r#""status":{"IPv4":{"lastUpdated":"2026-11-22T01:02:03Z","healthy":true},"IPv6":{"lastUpdated":"2026-11-22T01:02:03Z","healthy":true}}}"#
            )
        );
        // The Node is being deleted: /healthz 503 (the proxy itself still healthy), /livez 200.
        let (code, body) = health_answer(&h.health(at(t + 5)), Some(false), at(t + 5));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with(r#"{"lastUpdated":"2026-11-22T01:02:03Z","currentTime":"2026-11-22T01:02:08Z","nodeEligible":false,"healthy":true,"#),
            "{body}"
        );
        assert_eq!(
            health_answer(&h.health(at(t + 5)), None, at(t + 5)).0,
            StatusCode::OK
        );
        // A change late: both 503, lastUpdated the last sync.
        h.queued(at(t + 10));
        let (code, body) = health_answer(&h.health(at(t + 70)), None, at(t + 70));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with(r#"{"lastUpdated":"2026-11-22T01:02:03Z","currentTime":"2026-11-22T01:03:13Z","healthy":false,"status":{"IPv4":{"lastUpdated":"2026-11-22T01:02:03Z","healthy":false}"#),
            "{body}"
        );
        assert_eq!(
            health_answer(&h.health(at(t + 70)), Some(true), at(t + 70)).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn health_check_answers_are_kube_proxys() {
        let svc = ObjectRef::new("ns", "web");
        let (code, body) = health_check_answer(&svc, 2, true);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["service"]["name"], "web");
        let (code, body) = health_check_answer(&svc, 0, true);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"localEndpoints\": 0"));
        // Endpoints, but the proxy unhealthy: 503, and the body says why.
        let (code, body) = health_check_answer(&svc, 3, false);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("\"localEndpoints\": 3")
                && body.contains("\"serviceProxyHealthy\": false")
        );
    }

    #[test]
    fn only_ready_local_endpoints_count_once_per_address() {
        let snap = snapshot(&[
            lb_service("web", &["10.96.0.1"], 31000),
            // One ready local endpoint (in two slices: counted once, though it has two ports),
            // one local serving-but-terminating, one ready on another node.
            slice(
                "web-1",
                "web",
                "IPv4",
                &[
                    ("10.244.0.1", true, true, false, "node-a"),
                    ("10.244.0.2", false, true, true, "node-a"),
                    ("10.244.1.1", true, true, false, "node-b"),
                ],
            ),
            slice(
                "web-2",
                "web",
                "IPv4",
                &[("10.244.0.1", true, true, false, "node-a")],
            ),
            // Only a terminating local endpoint: 0, the load balancer drains the node.
            lb_service("draining", &["10.96.0.2"], 31001),
            slice(
                "draining-1",
                "draining",
                "IPv4",
                &[
                    ("10.244.0.3", false, true, true, "node-a"),
                    ("10.244.1.3", true, true, false, "node-b"),
                ],
            ),
            // Dual-stack: each family its own count.
            lb_service("dual", &["10.96.0.3", "fd00::3"], 31002),
            slice(
                "dual-4",
                "dual",
                "IPv4",
                &[("10.244.0.4", true, true, false, "node-a")],
            ),
            slice(
                "dual-6",
                "dual",
                "IPv6",
                &[
                    ("fd00:244::4", true, true, false, "node-a"),
                    ("fd00:244::5", true, true, false, "node-a"),
                ],
            ),
        ]);
        let ports = health_check_ports(&snap);
        let count = |p: u16| {
            ports[&p]
                .local_ready
                .clone()
                .into_iter()
                .collect::<Vec<_>>()
        };
        assert_eq!(count(31000), vec![(IpFamily::V4, 1)]);
        assert_eq!(ports[&31000].service, ObjectRef::new("ns", "web"));
        assert_eq!(count(31001), vec![(IpFamily::V4, 0)]);
        assert_eq!(count(31002), vec![(IpFamily::V4, 1), (IpFamily::V6, 2)]);
        assert_eq!(ports.len(), 3);
    }

    #[test]
    fn health_check_addresses_are_kube_proxys() {
        let node = NodeInfo {
            name: "node-a".into(),
            addresses: vec!["192.168.1.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            ..NodeInfo::default()
        };
        let local = || -> std::io::Result<Vec<IpAddr>> {
            Ok(["127.0.0.1", "192.168.1.10", "10.0.0.5", "::1", "fd00::10"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect())
        };
        let ips = |a: HealthCheckAddresses, f: IpFamily| -> Vec<String> {
            a.of_family(f, &node, &local)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        use HealthCheckAddresses::{NodePorts, Only};
        assert_eq!(
            ips(NodePorts(NodePortAddresses::All), IpFamily::V4),
            ["0.0.0.0"]
        );
        assert_eq!(ips(NodePorts(NodePortAddresses::All), IpFamily::V6), ["::"]);
        assert_eq!(
            ips(NodePorts(NodePortAddresses::Primary), IpFamily::V4),
            ["192.168.1.10"]
        );
        assert_eq!(
            ips(NodePorts(NodePortAddresses::Primary), IpFamily::V6),
            ["fd00::10"]
        );
        let no_v6 = NodeInfo {
            addresses: vec!["192.168.1.10".parse().unwrap()],
            ..node.clone()
        };
        assert_eq!(
            NodePorts(NodePortAddresses::Primary).of_family(IpFamily::V6, &no_v6, &local),
            vec![IpAddr::from(Ipv6Addr::UNSPECIFIED)]
        );
        let cidrs = |list: &[&str]| {
            NodePorts(NodePortAddresses::Cidrs(
                list.iter().map(|c| c.parse().unwrap()).collect(),
            ))
        };
        assert_eq!(
            ips(cidrs(&["192.168.0.0/16", "10.0.0.0/8"]), IpFamily::V4),
            ["10.0.0.5", "192.168.1.10"]
        );
        assert_eq!(ips(cidrs(&["127.0.0.0/8"]), IpFamily::V4), ["127.0.0.1"]);
        // No CIDR of the family, or a zero CIDR: kube-proxy matches every address.
        assert_eq!(ips(cidrs(&["192.168.0.0/16"]), IpFamily::V6), ["::"]);
        assert_eq!(
            ips(cidrs(&["0.0.0.0/0", "10.0.0.0/8"]), IpFamily::V4),
            ["0.0.0.0"]
        );
        assert_eq!(
            ips(cidrs(&["fd01::/64"]), IpFamily::V6),
            Vec::<String>::new()
        );
        assert_eq!(
            ips(Only("127.0.0.1".parse().unwrap()), IpFamily::V4),
            ["127.0.0.1"]
        );
        assert!(ips(Only("127.0.0.1".parse().unwrap()), IpFamily::V6).is_empty());
    }

    /// A plain HTTP/1.0 GET: the whole answer.
    fn get(addr: SocketAddr) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, 2 * S).expect("connect");
        s.set_read_timeout(Some(5 * S)).unwrap();
        write!(s, "GET /anything HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_check_servers_answer_each_family_with_its_count() {
        let have_v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let health = Arc::new(Health::new(60 * S));
        health.updated(SystemTime::now());
        // nodePortAddresses of the loopbacks: kube-proxy listens on the interface addresses
        // inside them (read from the host's interfaces here).
        let cidrs = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let servers = HealthCheckServers::new(
            HealthCheckAddresses::NodePorts(NodePortAddresses::Cidrs(cidrs)),
            health.clone(),
        );
        let want = |v4: usize, v6: usize| {
            BTreeMap::from([(
                port,
                HealthCheckWant {
                    service: ObjectRef::new("ns", "dual"),
                    local_ready: BTreeMap::from([(IpFamily::V4, v4), (IpFamily::V6, v6)]),
                },
            )])
        };
        let node = NodeInfo::default();
        servers.update(&node, &want(1, 2)).await;
        assert_eq!(servers.ports(), vec![port]);
        let v4: SocketAddr = ([127, 0, 0, 1], port).into();
        let v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port);
        let out = tokio::task::spawn_blocking(move || get(v4)).await.unwrap();
        assert!(out.starts_with("HTTP/1.0 200"), "{out}");
        assert!(out.contains("\"localEndpoints\": 1"), "{out}");
        let lower = out.to_lowercase();
        assert!(
            lower.contains("x-load-balancing-endpoint-weight: 1"),
            "{out}"
        );
        assert!(lower.contains("x-content-type-options: nosniff"), "{out}");
        assert!(lower.contains("content-type: application/json"), "{out}");
        if have_v6 {
            let out = tokio::task::spawn_blocking(move || get(v6)).await.unwrap();
            assert!(out.contains("\"localEndpoints\": 2"), "{out}");
        }
        // The counts follow; the proxy going unhealthy turns a 200 into a 503.
        servers.update(&node, &want(0, 2)).await;
        let out = tokio::task::spawn_blocking(move || get(v4)).await.unwrap();
        assert!(out.starts_with("HTTP/1.0 503"), "{out}");
        assert!(out.contains("\"localEndpoints\": 0"), "{out}");
        let late = SystemTime::now() - 120 * S;
        health.updated(late);
        health.queued(late);
        servers.update(&node, &want(1, 2)).await;
        let out = tokio::task::spawn_blocking(move || get(v4)).await.unwrap();
        assert!(out.starts_with("HTTP/1.0 503"), "{out}");
        assert!(out.contains("\"serviceProxyHealthy\": false"), "{out}");
        // Gone with the Service.
        servers.update(&node, &BTreeMap::new()).await;
        assert!(servers.ports().is_empty());
    }

    #[tokio::test]
    async fn listening_on_an_unspecified_address_takes_both_families() {
        let l = listen("0.0.0.0:0".parse().unwrap()).await.unwrap();
        let port = l.local_addr().unwrap().port();
        // Both loopbacks reach it where the host has IPv6 (the one socket is IPv6, v4-mapped).
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        if l.local_addr().unwrap().is_ipv6() {
            assert!(std::net::TcpStream::connect(("::1", port)).is_ok());
        }
    }
}
