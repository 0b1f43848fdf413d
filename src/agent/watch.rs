//! The apiserver side of the agent: kube-rs watchers feeding reflector stores.
//!
//! Each watcher lists, then watches, and on any break (apiserver restart, network cut, a 410
//! for an expired resourceVersion) lists again with backoff. The reflector stores swap their
//! content atomically when a re-list completes, so objects deleted while the watch was away
//! disappear, and a half-done list is never seen. Every change wakes the sync loop.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use crate::model::ObjectRef;

/// The stores the sync loop reads.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub node: Store<Node>,
    /// The cluster's ServiceCIDRs (few objects, read whole at every sync).
    pub service_cidrs: Store<ServiceCIDR>,
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
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    pub node_changes: Counter,
    pub service_cidr_changes: Counter,
    pub watch_errors: Counter,
}

/// The objects that watch events touched, by namespace/name, for the sync loop to convert
/// again; a completed re-list asks for the whole store.
#[derive(Debug, Default)]
pub struct Touched {
    pub services: BTreeSet<ObjectRef>,
    pub slices: BTreeSet<ObjectRef>,
    pub relisted_services: bool,
    pub relisted_slices: bool,
}

/// The part of [`Touched`] that one kind's watcher fills in.
type TouchedPart = fn(&mut Touched) -> (&mut BTreeSet<ObjectRef>, &mut bool);

/// Starts the three watchers on the current tokio runtime; returns their stores.
pub fn start(client: Client, node_name: &str, changes: Arc<Changes>) -> Stores {
    let (services, w) = reflector::store();
    let stream = reflector::reflector(
        w,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff(),
    );
    tokio::spawn(drive(
        "Service",
        stream,
        changes.clone(),
        |c| &c.service_changes,
        Some(|t| (&mut t.services, &mut t.relisted_services)),
    ));

    let (slices, w) = reflector::store();
    let stream = reflector::reflector(
        w,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff(),
    );
    tokio::spawn(drive(
        "EndpointSlice",
        stream,
        changes.clone(),
        |c| &c.endpoint_changes,
        Some(|t| (&mut t.slices, &mut t.relisted_slices)),
    ));

    let (node, w) = reflector::store();
    let config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let stream = reflector::reflector(
        w,
        watcher(Api::<Node>::all(client.clone()), config).default_backoff(),
    );
    // The Node is one object, read whole at every sync.
    tokio::spawn(drive(
        "Node",
        stream,
        changes.clone(),
        |c| &c.node_changes,
        None,
    ));

    let (service_cidrs, w) = reflector::store();
    let stream = reflector::reflector(
        w,
        watcher(Api::<ServiceCIDR>::all(client), watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(drive(
        "ServiceCIDR",
        stream,
        changes,
        |c| &c.service_cidr_changes,
        None,
    ));

    Stores {
        services,
        slices,
        node,
        service_cidrs,
    }
}

/// Polls one reflector stream forever, counting changes, noting what they touched (the
/// reflector has already applied each event to its store) and waking the sync loop.
async fn drive<K, S>(
    kind: &'static str,
    stream: S,
    changes: Arc<Changes>,
    counter: fn(&Changes) -> &Counter,
    touched: Option<TouchedPart>,
) where
    K: Resource,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let note = |key: Option<ObjectRef>| {
        if let Some(part) = touched {
            let mut t = changes.touched.lock().expect("touched lock");
            let (keys, relisted) = part(&mut t);
            match key {
                Some(k) => {
                    keys.insert(k);
                }
                None => *relisted = true,
            }
        }
        changes.dirty.store(true, Ordering::Release);
        changes.notify.notify_one();
    };
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                counter(&changes).inc();
                note(Some(super::mirror::key_of(&o)));
            }
            Ok(watcher::Event::InitDone) => {
                tracing::debug!(kind, "list complete");
                note(None);
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(e) => {
                changes.watch_errors.inc();
                tracing::warn!(kind, "watch failed, retrying with backoff: {e}");
            }
        }
    }
}
