//! The live agent: watches the apiserver and keeps the kernel's ruleset equal to what the
//! compiler says.
//!
//! It owns no Service semantics: it wires the watch source ([`watch`]) to the compiler and the
//! nftables backend over time. Nothing is written until the first complete lists of Services and
//! EndpointSlices have arrived (a restarting agent never applies a half-empty ruleset; the rules
//! already in the kernel keep serving meanwhile). Syncs are paced as kube-proxy paces them
//! ([`pacer`]): the first changes after a quiet period apply at once (a burst of two syncs), and
//! under sustained churn syncs are spaced by `min_sync_period`, each taking in every change that
//! arrived meanwhile; a full resync every `sync_period` repairs drift; a failed sync is retried
//! with backoff, as a full one. Stopping leaves the rules in place.

pub mod fetch;
pub mod metrics;
mod mirror;
mod pacer;
pub mod serve;
pub mod state;
pub mod sysctl;
pub mod watch;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch as signal};

use crate::backend::{Live, Mode};
use crate::conntrack::{Conntrack, StaleFlows};
use crate::convert::{self, ObjectKind, Rejected};
use crate::model::{NodeInfo, ProxyConfig, Snapshot};
use crate::plan::Plan;
use crate::report::{ApplyReport, SyncKind};
use metrics::Metrics;
use pacer::{BURST_SYNCS, Pacer};
use serve::{Health, HealthCheckAddresses, HealthCheckServers};
use watch::{Changes, Stores, TriggerTime};

/// Everything the agent is configured with.
#[derive(Clone)]
pub struct AgentConfig {
    pub kube: kube::Config,
    pub node_name: String,
    /// The node's addresses, overriding the Node object's (empty: use the Node's).
    pub node_ips: Vec<IpAddr>,
    pub proxy: ProxyConfig,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub healthz_address: Option<SocketAddr>,
    pub metrics_address: Option<SocketAddr>,
    /// Where health check node ports listen: unspecified (`0.0.0.0`, the default) for
    /// kube-proxy's addresses, derived from `nodePortAddresses`; a specific address for that
    /// address alone (tests).
    pub health_check_address: IpAddr,
    /// Which backend, and where its programs run.
    pub backend: Mode,
    /// How many warnings the configuration gave (fields set that svcproxy does not use, values
    /// it reads differently): logged at start-up by the caller, exported here as the gauge
    /// `svcproxy_config_warnings`, so that a fleet's dashboards see them too.
    pub config_warnings: usize,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("cannot listen on {address} for {what}: {source}")]
    Listen {
        what: &'static str,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// One sync, as the agent reports it (to tests and to the log).
#[derive(Debug, Clone)]
pub struct SyncRecord {
    pub kind: SyncKind,
    pub services: usize,
    pub slices: usize,
    pub report: ApplyReport,
    /// Where the sync's time went.
    pub phases: Phases,
    /// How many stale UDP flow filters this sync made (and deleted the conntrack entries of,
    /// before this record was sent).
    pub stale_udp_flows: usize,
}

/// When a sync started, since when its change had waited, and where its time went.
struct Timing {
    start: Instant,
    pending: Option<Instant>,
    phases: Phases,
}

/// The parts of one sync, timed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    /// Reading the stores and converting the objects into the model.
    pub convert: Duration,
    /// Plan, render, and working out what to send (only the changed Services, in the
    /// nftables mode).
    pub compile: Duration,
    /// The kernel transaction: nft, or iptables-restore (the apply report's duration).
    pub apply: Duration,
}

/// Runs the agent until SIGTERM or SIGINT (`svcproxy run`). Stopping leaves the rules in place.
pub async fn run_until_signalled(config: AgentConfig) -> Result<(), AgentError> {
    let (stop_tx, stop_rx) = signal::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping; the rules stay in place");
        let _ = stop_tx.send(true);
    });
    run(config, stop_rx, None).await
}

/// Runs the agent until `stop` turns true. `observer`, if given, hears of every sync.
pub async fn run(
    config: AgentConfig,
    stop: signal::Receiver<bool>,
    observer: Option<mpsc::UnboundedSender<SyncRecord>>,
) -> Result<(), AgentError> {
    let client = kube::Client::try_from(config.kube.clone())?;
    let changes = Arc::new(Changes::default());
    let metrics = Arc::new(Metrics::new(&changes, config.backend.is_iptables()));
    metrics
        .config_warnings
        .set(i64::try_from(config.config_warnings).unwrap_or(i64::MAX));
    let health = Arc::new(Health::new(serve::health_timeout(config.sync_period)));
    let (state, state_requests) = state::AgentState::new();
    // As kube-proxy when its sync loop starts: healthy unless a change then waits too long.
    let started = SystemTime::now();
    health.updated(started);
    metrics.queued(started);
    if let Some(address) = config.healthz_address {
        let listener = serve::listen(address)
            .await
            .map_err(|source| AgentError::Listen {
                what: "healthz",
                address,
                source,
            })?;
        tokio::spawn(serve::serve_health(
            listener,
            health.clone(),
            metrics.clone(),
            stop.clone(),
        ));
    }
    if let Some(address) = config.metrics_address {
        let listener = serve::listen(address)
            .await
            .map_err(|source| AgentError::Listen {
                what: "metrics",
                address,
                source,
            })?;
        tokio::spawn(serve::serve_metrics(
            listener,
            metrics.clone(),
            state.clone(),
            stop.clone(),
        ));
    }
    let stores = watch::start(client, &config.node_name, changes.clone());
    let syncer = Syncer {
        health_checks: HealthCheckServers::new(
            if config.health_check_address.is_unspecified() {
                HealthCheckAddresses::NodePorts(config.proxy.nodeport_addresses.clone())
            } else {
                HealthCheckAddresses::Only(config.health_check_address)
            },
            health.clone(),
        ),
        config,
        stores,
        changes,
        metrics,
        health,
        state,
        state_requests,
        observer,
        rejected: BTreeSet::new(),
        conflicts: BTreeSet::new(),
        notified_ready: false,
        trigger_times: Vec::new(),
    };
    syncer.run(stop).await;
    Ok(())
}

struct Syncer {
    config: AgentConfig,
    stores: Stores,
    changes: Arc<Changes>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// What `/state/…` on the metrics address serves.
    state: Arc<state::AgentState>,
    /// Requests for the snapshot last applied, answered between syncs.
    state_requests: tokio::sync::mpsc::Receiver<state::StateRequest>,
    health_checks: HealthCheckServers,
    observer: Option<mpsc::UnboundedSender<SyncRecord>>,
    /// The problems reported at the last sync, so that each is logged once, not every sync.
    rejected: BTreeSet<String>,
    conflicts: BTreeSet<String>,
    notified_ready: bool,
    /// The trigger times of the EndpointSlice changes the next successful sync applies.
    trigger_times: Vec<TriggerTime>,
}

/// Waits for `stop` to turn true.
async fn stopped(stop: &mut signal::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Syncer {
    async fn run(mut self, mut stop: signal::Receiver<bool>) {
        tokio::select! {
            _ = async {
                let _ = self.stores.services.wait_until_ready().await;
                let _ = self.stores.slices.wait_until_ready().await;
            } => {}
            _ = stopped(&mut stop) => return,
        }
        tracing::info!("initial lists of Services and EndpointSlices complete");
        let mut backend = Some(Live::new(
            self.config.backend.clone(),
            self.config.proxy.clone(),
        ));
        let mut pacer = Pacer::new(self.config.min_sync_period, BURST_SYNCS);
        let mut next_full = later(Instant::now(), self.config.sync_period);
        let mut failures = 0u32;
        let mut retry_at: Option<Instant> = None;
        // The first sync is due now (as kube-proxy's, not a queued change for health).
        let mut pending: Option<Instant> = Some(Instant::now());
        // Whether the next sync is the periodic full resync: the kernel is compared with the
        // last plan just before it rewrites the tables (`svcproxy_ruleset_drift`).
        let mut resync = false;
        loop {
            if pending.is_none() {
                let change = tokio::select! {
                    _ = self.changes.notify.notified() => {
                        self.count_pending();
                        if !self.changes.dirty.load(Ordering::Acquire) {
                            continue;
                        }
                        true
                    }
                    _ = tokio::time::sleep_until(next_full.into()) => {
                        backend.as_mut().expect("backend").invalidate();
                        resync = true;
                        false
                    }
                    Some(reply) = self.state_requests.recv() => {
                        self.answer_state(backend.as_ref(), reply);
                        continue;
                    }
                    _ = stopped(&mut stop) => return,
                };
                pending = Some(Instant::now());
                // A change waits for a sync (health and the queued timestamp); the periodic
                // resync is not one, as in kube-proxy.
                if change {
                    let now = SystemTime::now();
                    self.health.queued(now);
                    self.metrics.queued(now);
                }
            }
            // Wait for the pacer and any retry backoff. Changes arriving meanwhile join this
            // sync (it reads the stores when it starts); they only update the pending gauges.
            loop {
                let now = Instant::now();
                let mut earliest = pacer.earliest(now);
                if let Some(r) = retry_at {
                    earliest = earliest.max(r);
                }
                if earliest <= now {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(earliest.into()) => {}
                    _ = self.changes.notify.notified() => self.count_pending(),
                    Some(reply) = self.state_requests.recv() => {
                        self.answer_state(backend.as_ref(), reply);
                    }
                    _ = stopped(&mut stop) => return,
                }
            }
            let start = Instant::now();
            pacer.started(start);
            self.changes.dirty.store(false, Ordering::Release);

            let snapshot = self.snapshot();
            self.count_pending();
            let convert = start.elapsed();
            let mut live = backend.take().expect("backend");
            let check_drift = std::mem::take(&mut resync);
            let (live, result, drift) = tokio::task::spawn_blocking(move || {
                let drift = if check_drift { live.verify() } else { None };
                let r = live.sync(snapshot);
                if check_drift || r.as_ref().is_ok_and(|o| o.report.kind == SyncKind::Full) {
                    release_free_memory();
                }
                (live, r, drift)
            })
            .await
            .expect("apply task");
            pacer.ended(Instant::now());
            match drift {
                Some(Ok(differences)) => {
                    self.metrics.ruleset_drift.set(differences.len() as i64);
                    if differences.is_empty() {
                        tracing::debug!("before the full resync: the kernel held the plan's rules");
                    } else {
                        tracing::warn!(
                            differences = differences.len(),
                            "before the full resync: the kernel's rules had drifted from the plan (the resync repairs them): {}",
                            differences
                                .iter()
                                .take(10)
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join("; ")
                        );
                    }
                }
                Some(Err(e)) => {
                    self.metrics.ruleset_drift.set(-1);
                    tracing::warn!("before the full resync: reading the kernel's rules: {e}");
                }
                None => {}
            }
            let live = &*backend.insert(live);
            match result {
                Ok(outcome) => {
                    if let Some(f) = &outcome.fallback {
                        self.metrics
                            .incremental_fallbacks
                            .get_or_create(&vec![("reason".into(), f.reason().into())])
                            .inc();
                    }
                    let report = outcome.report;
                    failures = 0;
                    retry_at = None;
                    if report.kind == SyncKind::Full {
                        next_full = later(start, self.config.sync_period);
                    }
                    if !self.notified_ready {
                        // systemd (Type=notify): ready once the first ruleset is in the kernel.
                        sd_notify("READY=1");
                        self.notified_ready = true;
                    }
                    let phases = Phases {
                        convert,
                        compile: outcome.compile,
                        apply: report.duration,
                    };
                    let timing = Timing {
                        start,
                        pending: pending.take(),
                        phases,
                    };
                    let (snapshot, plan) = (
                        live.snapshot().expect("synced"),
                        live.plan().expect("synced"),
                    );
                    let conntrack = live.mode().conntrack();
                    self.after_sync(
                        snapshot,
                        plan,
                        outcome.stale_udp,
                        conntrack,
                        &report,
                        timing,
                    )
                    .await;
                }
                Err(e) => {
                    failures += 1;
                    let backoff = Duration::from_millis(500 * 2u64.pow(failures.min(6)))
                        .min(Duration::from_secs(30));
                    retry_at = Some(Instant::now() + backoff);
                    self.metrics.sync_failed(e.metric_label());
                    self.state.failed(e.to_string(), start.elapsed());
                    tracing::error!(
                        "sync failed (the kernel keeps its previous rules), retrying as a full sync in {backoff:?}: {e}"
                    );
                    // `pending` stays set: the change is still waiting.
                }
            }
        }
    }

    /// Sets the pending-change gauges: the Services and EndpointSlices changed since the last
    /// sync read the stores (kube-proxy's `…_changes_pending`, reset when a sync takes them).
    fn count_pending(&self) {
        let touched = self.changes.touched.lock().expect("touched lock");
        let (services, slices) = (touched.services.len(), touched.slices.len());
        drop(touched);
        self.metrics.service_changes_pending.set(services as i64);
        self.metrics.endpoint_changes_pending.set(slices as i64);
    }

    /// `/state/snapshot`'s question: a copy of the snapshot last applied (sharing its objects).
    fn answer_state(&self, backend: Option<&Live>, reply: state::StateRequest) {
        let applied = backend.and_then(|b| b.snapshot()).map(|s| {
            Arc::new(state::Applied {
                config: self.config.proxy.clone(),
                mode: self.config.backend.family_name().into(),
                snapshot: s.clone(),
            })
        });
        let _ = reply.send(applied);
    }

    /// Everything after a successful apply: stale UDP flows, health, metrics, health check
    /// servers, the log line.
    async fn after_sync(
        &mut self,
        snapshot: &Snapshot,
        plan: &Plan,
        stale: Vec<StaleFlows>,
        conntrack: Option<Conntrack>,
        report: &ApplyReport,
        timing: Timing,
    ) {
        let Timing {
            start,
            pending,
            phases,
        } = timing;
        let conflicts: BTreeSet<String> = plan.conflicts.iter().map(ToString::to_string).collect();
        for c in conflicts.difference(&self.conflicts) {
            tracing::warn!("skipped: {c}");
        }
        self.conflicts = conflicts;
        let stale_udp_flows = stale.len();
        // No conntrack table: an in-memory kernel (tests), whose flows are the outcome's.
        if let Some(ct) = conntrack.filter(|_| !stale.is_empty()) {
            match tokio::task::spawn_blocking(move || ct.flush(&stale))
                .await
                .expect("conntrack task")
            {
                Ok(f) => tracing::debug!(
                    examined = f.examined,
                    deleted = f.deleted,
                    "deleted stale UDP conntrack entries"
                ),
                Err(e) => {
                    self.metrics.conntrack_failures.inc();
                    tracing::warn!("deleting stale UDP conntrack entries: {e}");
                }
            }
        }
        let elapsed = start.elapsed();
        let now = SystemTime::now();
        self.state.synced(state::SyncOutcome {
            at: serve::rfc3339(Some(now)),
            ok: true,
            kind: Some(report.kind.as_str().to_string()),
            error: None,
            services: snapshot.services.len(),
            endpoint_slices: snapshot.slices.len(),
            elements_added: report.elements_added,
            elements_deleted: report.elements_deleted,
            chains_changed: report.chains_changed,
            duration_ms: elapsed.as_secs_f64() * 1e3,
        });
        self.health.updated(now);
        self.metrics.synced(report.kind, elapsed, now, plan);
        if let Some(since) = pending {
            self.metrics
                .change_to_kernel
                .observe(since.elapsed().as_secs_f64());
        }
        // kube-proxy's network programming latency: from each applied EndpointSlice change's
        // trigger time (the Pod or Service change behind it) to now.
        for t in self.trigger_times.drain(..) {
            let latency = now.duration_since(t.at).unwrap_or_default();
            self.metrics.network_programmed(t.family, latency);
        }
        self.health_checks
            .update(&snapshot.node, &serve::health_check_ports(snapshot))
            .await;
        // A sync that found nothing to change (a Node heartbeat, say) is logged quietly.
        macro_rules! synced {
            ($level:ident) => {
                tracing::$level!(
                    kind = report.kind.as_str(),
                    services = snapshot.services.len(),
                    endpoint_slices = snapshot.slices.len(),
                    elements_added = report.elements_added,
                    elements_deleted = report.elements_deleted,
                    chains = report.chains_changed,
                    duration_ms = (elapsed.as_secs_f64() * 1e4).round() / 10.0,
                    convert_ms = (phases.convert.as_secs_f64() * 1e4).round() / 10.0,
                    compile_ms = (phases.compile.as_secs_f64() * 1e4).round() / 10.0,
                    apply_ms = (phases.apply.as_secs_f64() * 1e4).round() / 10.0,
                    full_because = report.full_because.as_deref().unwrap_or(""),
                    "synced"
                )
            };
        }
        if report.commands > 0 {
            synced!(info);
        } else {
            synced!(debug);
        }
        if let Some(tx) = &self.observer {
            let _ = tx.send(SyncRecord {
                kind: report.kind,
                services: snapshot.services.len(),
                slices: snapshot.slices.len(),
                report: report.clone(),
                phases,
                stale_udp_flows,
            });
        }
    }

    /// The cluster as the watchers have converted it now (the maps share every object with
    /// the watchers' and with the previous snapshot, so this copies pointers only).
    fn snapshot(&mut self) -> Snapshot {
        // What changed is in the maps already; the note of it is only cleared here.
        drop(std::mem::take(
            &mut *self.changes.touched.lock().expect("touched lock"),
        ));
        self.trigger_times.extend(self.changes.take_trigger_times());
        // Whole objects that could not be used, then elements left out of used ones.
        let (services, mut problems, mut skipped) = {
            let m = self.stores.services.lock();
            let problems: Vec<Rejected> = m.rejected.values().cloned().collect();
            let skipped: Vec<Rejected> = m.skipped.values().flatten().cloned().collect();
            (m.objects.clone(), problems, skipped)
        };
        let slices = {
            let m = self.stores.slices.lock();
            problems.extend(m.rejected.values().cloned());
            skipped.extend(m.skipped.values().flatten().cloned());
            m.objects.clone()
        };
        let mut node = NodeInfo {
            name: self.config.node_name.clone(),
            ..NodeInfo::default()
        };
        let mut seen = false;
        if let Some(n) = self
            .stores
            .node
            .state()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(&node.name))
        {
            let (info, node_problems) = convert::node(&n);
            node = info;
            skipped.extend(node_problems);
            seen = true;
        }
        // `/healthz` fails while the Node is going away (or unknown), as kube-proxy's.
        self.health.node(seen.then(|| node.eligible()));
        if !self.config.node_ips.is_empty() {
            node.addresses = self.config.node_ips.clone();
        }
        let mut service_cidrs = Vec::new();
        for obj in self.stores.service_cidrs.state() {
            let (cidrs, bad) = convert::service_cidr(&obj);
            service_cidrs.extend(cidrs);
            skipped.extend(bad);
        }
        service_cidrs.sort();
        service_cidrs.dedup();
        // Each problem logged once; the gauges say how many there are now.
        let current: BTreeSet<String> = problems
            .iter()
            .chain(&skipped)
            .map(ToString::to_string)
            .collect();
        for p in &current {
            if !self.rejected.contains(p) {
                tracing::warn!("skipped: {p}");
            }
        }
        self.rejected = current;
        for kind in [
            ObjectKind::Service,
            ObjectKind::EndpointSlice,
            ObjectKind::Node,
            ObjectKind::ServiceCidr,
        ] {
            let label = vec![("kind".to_string(), kind.to_string())];
            let n = problems.iter().filter(|p| p.kind == kind).count();
            self.metrics
                .invalid_objects
                .get_or_create(&label)
                .set(n as i64);
            let n = skipped.iter().filter(|p| p.kind == kind).count();
            self.metrics
                .skipped_fields
                .get_or_create(&label)
                .set(n as i64);
        }
        Snapshot {
            services,
            slices,
            node,
            service_cidrs,
        }
    }
}

/// `t + d`, or as late as an `Instant` goes: configured periods are bounded (Go's ~292 years),
/// but no configured value may make the agent panic.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(crate::duration::MAX_DURATION))
        .unwrap_or(t)
}

/// Gives the memory a whole compile or a drift check freed back to the kernel. glibc keeps
/// freed memory for reuse, and after an hourly resync at 10k Services that was 100 MiB of
/// RSS (the kernel's and the plan's tables as the drift check compares them, a whole
/// compile's second plan), held for the rest of the hour against the container's limit beside
/// the next `nft`. Rare (full syncs only) and a few milliseconds.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's heaps; it touches no live
    // allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sends a state line to systemd's notification socket (`$NOTIFY_SOCKET`), if there is one.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => UnixAddr::from_abstract_name(abstract_name)?,
            None => UnixAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    match sent {
        Ok(_) => tracing::debug!("told systemd {state}"),
        Err(e) => tracing::warn!("cannot notify systemd ({state}): {e}"),
    }
}
