//! The apiserver side of the agent: kube-rs watchers, converting each object as it arrives.
//!
//! Each watcher lists, then watches, and on any break (apiserver restart, network cut, a 410
//! for an expired resourceVersion) lists again with backoff. Services and EndpointSlices are
//! converted into the model on arrival and only the model is kept ([`Mirror`]); a re-list
//! replaces the view atomically when it completes, so objects deleted while the watch was away
//! disappear, and a half-done list is never seen. The Node, one object read whole at every
//! sync, is kept in a reflector store, stripped of what no one reads. Every change to the model
//! wakes the sync loop.
//!
//! Services and EndpointSlices are watched with kube-proxy's label selector ([`SELECTOR`]):
//! objects claimed by another proxy and headless Services' slices are never sent, let alone
//! held. The same labels are checked again here, in case a server ignored the selector.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use super::mirror::{ConvertResult, Mirror, key_of};
use crate::convert::{self, SERVICE_PROXY_NAME_LABEL};
use crate::model::{self, IpFamily, ObjectRef};

/// Label the EndpointSlice controller puts on a headless Service's slices.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// kube-proxy's label selector for Services and EndpointSlices (cmd/kube-proxy/app/server.go:
/// one informer factory, the same selector for both kinds): nothing another proxy claims, and
/// no headless slices.
pub const SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// The annotation the EndpointSlice controller sets to the time of the change (a Pod or
/// Service update) that caused a slice to be written.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// What the sync loop reads.
#[derive(Clone)]
pub struct Stores {
    pub services: Arc<Shared<model::Service>>,
    pub slices: Arc<Shared<model::EndpointSlice>>,
    pub node: Store<Node>,
    /// The cluster's ServiceCIDRs (few objects, read whole at every sync).
    pub service_cidrs: Store<ServiceCIDR>,
}

/// One kind's converted objects, shared between its watcher and the sync loop.
pub struct Shared<T> {
    mirror: Mutex<Mirror<T>>,
    /// True once the first list has completed.
    ready: tokio::sync::watch::Sender<bool>,
}

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Shared {
            mirror: Mutex::new(Mirror::default()),
            ready: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl<T> Shared<T> {
    /// Returns once the first complete list is in.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// The converted objects as they are now.
    pub fn lock(&self) -> MutexGuard<'_, Mirror<T>> {
        self.mirror.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the watchers tell the sync loop and the metrics.
#[derive(Default)]
pub struct Changes {
    /// Wakes the sync loop.
    pub notify: Notify,
    /// Set with every change, cleared by the sync loop when it reads the stores: a wake-up with
    /// nothing new (a permit left from changes the last sync already saw) is ignored.
    pub dirty: AtomicBool,
    /// Which objects changed since the sync loop last looked.
    pub touched: Mutex<Touched>,
    /// EndpointSlice trigger times not yet taken by a sync.
    pub trigger_times: Mutex<TriggerTimes>,
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    pub node_changes: Counter,
    pub service_cidr_changes: Counter,
    pub watch_errors: Counter,
}

/// The objects whose model changed, by namespace/name; a re-list that changed something sets
/// its kind's flag.
#[derive(Debug, Default)]
pub struct Touched {
    pub services: BTreeSet<ObjectRef>,
    pub slices: BTreeSet<ObjectRef>,
    pub relisted_services: bool,
    pub relisted_slices: bool,
}

/// When the change behind an EndpointSlice update happened, for the network programming
/// latency (kube-proxy's `kubeproxy_network_programming_duration_seconds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerTime {
    /// The slice's Service: kube-proxy forgets a Service's pending times when one of its
    /// slices is deleted.
    pub service: ObjectRef,
    pub family: IpFamily,
    pub at: SystemTime,
}

/// Pending trigger times, as kube-proxy's EndpointsChangeTracker keeps them.
#[derive(Debug)]
pub struct TriggerTimes {
    /// When the agent started: earlier trigger times are not measured (a restart would
    /// otherwise report the age of every slice).
    pub started: SystemTime,
    pub pending: Vec<TriggerTime>,
}

impl Default for TriggerTimes {
    fn default() -> Self {
        TriggerTimes {
            started: SystemTime::now(),
            pending: Vec::new(),
        }
    }
}

impl Changes {
    fn trigger_times(&self) -> MutexGuard<'_, TriggerTimes> {
        self.trigger_times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the trigger times the watchers noted since the last call.
    pub fn take_trigger_times(&self) -> Vec<TriggerTime> {
        std::mem::take(&mut self.trigger_times().pending)
    }
}

/// The trigger time an EndpointSlice carries, as kube-proxy reads it: RFC 3339 with optional
/// fractional seconds; absent or unparsable (logged) means none.
pub fn trigger_time(meta: &ObjectMeta) -> Option<SystemTime> {
    let text = meta.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
    match text.parse::<k8s_openapi::jiff::Timestamp>() {
        Ok(t) => Some(t.into()),
        Err(e) => {
            tracing::warn!(
                "EndpointSlice {}/{}: annotation {TRIGGER_TIME_ANNOTATION}: {text:?}: {e}",
                meta.namespace.as_deref().unwrap_or(""),
                meta.name.as_deref().unwrap_or("")
            );
            None
        }
    }
}

/// Whether kube-proxy's selector admits an object: the local check behind the server-side one.
fn selected(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().is_none_or(|l| {
        !l.contains_key(SERVICE_PROXY_NAME_LABEL) && !l.contains_key(HEADLESS_LABEL)
    })
}

/// A kind whose objects are kept converted.
trait Watched: PartialEq + Send + Sync + Sized + 'static {
    const KIND: &'static str;
    type Object: Resource + std::fmt::Debug + Send;
    fn convert(object: &Self::Object) -> ConvertResult<Self>;
    fn counter(changes: &Changes) -> &Counter;
    fn touched(t: &mut Touched) -> (&mut BTreeSet<ObjectRef>, &mut bool);
    /// The trigger time of a change to this object (slices only).
    fn trigger(&self, _object: &Self::Object) -> Option<TriggerTime> {
        None
    }
    /// The Service whose pending trigger times a deletion forgets (slices only).
    fn owner(&self) -> Option<&ObjectRef> {
        None
    }
}

impl Watched for model::Service {
    const KIND: &'static str = "Service";
    type Object = Service;
    fn convert(object: &Service) -> ConvertResult<Self> {
        convert::service(object)
    }
    fn counter(changes: &Changes) -> &Counter {
        &changes.service_changes
    }
    fn touched(t: &mut Touched) -> (&mut BTreeSet<ObjectRef>, &mut bool) {
        (&mut t.services, &mut t.relisted_services)
    }
}

impl Watched for model::EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    type Object = EndpointSlice;
    fn convert(object: &EndpointSlice) -> ConvertResult<Self> {
        convert::endpoint_slice(object)
    }
    fn counter(changes: &Changes) -> &Counter {
        &changes.endpoint_changes
    }
    fn touched(t: &mut Touched) -> (&mut BTreeSet<ObjectRef>, &mut bool) {
        (&mut t.slices, &mut t.relisted_slices)
    }
    fn trigger(&self, object: &EndpointSlice) -> Option<TriggerTime> {
        Some(TriggerTime {
            service: self.service.clone(),
            family: self.family,
            at: trigger_time(&object.metadata)?,
        })
    }
    fn owner(&self) -> Option<&ObjectRef> {
        Some(&self.service)
    }
}

/// Starts the four watchers on the current tokio runtime; returns what they fill.
pub fn start(client: Client, node_name: &str, changes: Arc<Changes>) -> Stores {
    let selected = || watcher::Config::default().labels(SELECTOR);

    let services = Arc::new(Shared::default());
    let stream = watcher(Api::<Service>::all(client.clone()), selected()).default_backoff();
    tokio::spawn(drive(stream, services.clone(), changes.clone()));

    let slices = Arc::new(Shared::default());
    let stream = watcher(Api::<EndpointSlice>::all(client.clone()), selected()).default_backoff();
    tokio::spawn(drive(stream, slices.clone(), changes.clone()));

    let (node, w) = reflector::store();
    let config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let stream = reflector::reflector(
        w,
        watcher(Api::<Node>::all(client.clone()), config)
            .modify(strip_node)
            .default_backoff(),
    );
    // The Node and the ServiceCIDRs are few objects, read whole at every sync.
    tokio::spawn(drive_whole("Node", stream, changes.clone(), |c| {
        &c.node_changes
    }));

    let (service_cidrs, w) = reflector::store();
    let stream = reflector::reflector(
        w,
        watcher(Api::<ServiceCIDR>::all(client), watcher::Config::default())
            .modify(|o| o.metadata.managed_fields = None)
            .default_backoff(),
    );
    tokio::spawn(drive_whole("ServiceCIDR", stream, changes, |c| {
        &c.service_cidr_changes
    }));

    Stores {
        services,
        slices,
        node,
        service_cidrs,
    }
}

/// What no one reads of the Node: managedFields, and the list of container images (kilobytes
/// on a busy node).
fn strip_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    if let Some(status) = &mut node.status {
        status.images = None;
    }
}

impl Changes {
    /// Notes a change to the model (`None`: a re-list changed it) and wakes the sync loop.
    fn note<T: Watched>(&self, key: Option<ObjectRef>) {
        {
            let mut t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            let (keys, relisted) = T::touched(&mut t);
            match key {
                Some(k) => {
                    keys.insert(k);
                }
                None => *relisted = true,
            }
        }
        self.wake();
    }

    fn wake(&self) {
        self.dirty.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Notes trigger times, keeping only those after the agent started (as kube-proxy).
    fn add_trigger_times(&self, times: impl IntoIterator<Item = TriggerTime>) {
        let mut tt = self.trigger_times();
        let started = tt.started;
        tt.pending
            .extend(times.into_iter().filter(|t| t.at > started));
    }
}

/// Converts `object` unless kube-proxy's selector leaves it out.
fn convert_selected<T: Watched>(object: &T::Object) -> ConvertResult<T> {
    if selected(object.meta()) {
        T::convert(object)
    } else {
        Ok(None)
    }
}

/// Polls one kind's watch stream forever: converts each object into the mirror, counts
/// changes, notes what they touched and wakes the sync loop when the model changed.
async fn drive<T, S>(stream: S, shared: Arc<Shared<T>>, changes: Arc<Changes>)
where
    T: Watched,
    S: Stream<Item = Result<watcher::Event<T::Object>, watcher::Error>>,
{
    let kind = T::KIND;
    // Trigger times of objects a list in progress changes: noted when it completes.
    let mut listed = Vec::new();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(o)) => {
                T::counter(&changes).inc();
                let key = key_of(&o);
                let result = convert_selected::<T>(&o);
                let trigger = match &result {
                    Ok(Some(m)) => m.object.trigger(&o),
                    _ => None,
                };
                drop(o);
                if shared.lock().apply(key.clone(), result) {
                    changes.add_trigger_times(trigger);
                    changes.note::<T>(Some(key));
                }
            }
            Ok(watcher::Event::Delete(o)) => {
                T::counter(&changes).inc();
                let key = key_of(&o);
                drop(o);
                let (changed, old) = shared.lock().delete(&key);
                if let Some(service) = old.as_deref().and_then(T::owner) {
                    // As kube-proxy: a deletion's trigger time is not the change's.
                    changes
                        .trigger_times()
                        .pending
                        .retain(|t| t.service != *service);
                }
                if changed {
                    changes.note::<T>(Some(key));
                }
            }
            Ok(watcher::Event::Init) => {
                listed.clear();
                shared.lock().begin_list();
            }
            Ok(watcher::Event::InitApply(o)) => {
                let key = key_of(&o);
                let result = convert_selected::<T>(&o);
                let trigger = match &result {
                    Ok(Some(m)) => m.object.trigger(&o),
                    _ => None,
                };
                drop(o);
                if shared.lock().list_apply(key, result) {
                    listed.extend(trigger);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let changed = shared.lock().end_list();
                tracing::debug!(kind, changed, "list complete");
                changes.add_trigger_times(listed.drain(..));
                shared.ready.send_replace(true);
                if changed {
                    changes.note::<T>(None);
                }
            }
            Err(e) => {
                changes.watch_errors.inc();
                tracing::warn!(kind, "watch failed, retrying with backoff: {e}");
            }
        }
    }
}

/// Polls the reflector stream of a kind read whole at every sync (the Node, the ServiceCIDRs)
/// forever: the reflector has already applied each event to its store; this counts changes
/// and wakes the sync loop.
async fn drive_whole<K, S>(
    kind: &'static str,
    stream: S,
    changes: Arc<Changes>,
    counter: fn(&Changes) -> &Counter,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                counter(&changes).inc();
                changes.wake();
            }
            Ok(watcher::Event::InitDone) => {
                tracing::debug!(kind, "list complete");
                changes.wake();
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(e) => {
                changes.watch_errors.inc();
                tracing::warn!(kind, "watch failed, retrying with backoff: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_selector_is_checked_locally_too() {
        assert!(selected(&meta(serde_json::json!({"name": "a"}))));
        assert!(selected(&meta(
            serde_json::json!({"labels": {"kubernetes.io/service-name": "a"}})
        )));
        assert!(!selected(&meta(
            serde_json::json!({"labels": {HEADLESS_LABEL: ""}})
        )));
        assert!(!selected(&meta(
            serde_json::json!({"labels": {SERVICE_PROXY_NAME_LABEL: "other"}})
        )));
    }

    #[test]
    fn trigger_times_parse_as_kube_proxy_reads_them() {
        let at = |v: &str| {
            trigger_time(&meta(
                serde_json::json!({"annotations": {TRIGGER_TIME_ANNOTATION: v}}),
            ))
        };
        let t = at("2024-05-01T10:00:00.123456789Z").expect("RFC 3339 with nanoseconds");
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(secs.as_secs(), 1714557600);
        assert_eq!(secs.subsec_nanos(), 123456789);
        assert!(at("2024-05-01T12:00:00+02:00").is_some());
        assert!(at("yesterday").is_none());
        assert!(trigger_time(&meta(serde_json::json!({"name": "a"}))).is_none());
    }
}
