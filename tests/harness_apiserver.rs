//! The test harness's own tests, not svcproxy's: the in-process apiserver that tests/agent.rs
//! uses must speak the Kubernetes list/watch protocol faithfully, so it is checked here on its own.
//!
//! The fake apiserver (tests/common/apiserver.rs) against the real kube-rs
//! client: response shapes compared with responses recorded from a real
//! kube-apiserver (tests/fixtures/apiserver), and kube-runtime's watcher and
//! reflector driven through lists, watches, bookmarks, compaction, dropped
//! watches, outages and held lists.

#[allow(dead_code)]
#[path = "common/apiserver.rs"]
mod apiserver;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiserver::{FakeApiServer, FakeOptions, Outage, continue_token_json, wait_until};
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, VersionMatch, WatchEvent, WatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Bound for every wait on the client: generous, never reached when the harness works.
const T: Duration = Duration::from_secs(20);

macro_rules! fixture {
    ($name:literal) => {
        serde_json::from_str::<Value>(include_str!(concat!("fixtures/apiserver/", $name)))
            .expect($name)
    };
}

macro_rules! fixture_lines {
    ($name:literal) => {
        include_str!(concat!("fixtures/apiserver/", $name))
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<Value>(l).expect($name))
            .collect::<Vec<Value>>()
    };
}

fn svc(name: &str, labels: Value, port: u16) -> Value {
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": { "name": name, "namespace": "default", "labels": labels },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "ports": [{ "name": "http", "protocol": "TCP", "port": port, "targetPort": 8080 }]
        }
    })
}

fn node(name: &str, zone: &str) -> Value {
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": { "name": name, "labels": { "topology.kubernetes.io/zone": zone } },
        "spec": { "podCIDR": "172.17.9.0/24", "podCIDRs": ["172.17.9.0/24"] }
    })
}

/// The object without `metadata.resourceVersion` (which the fake assigns).
fn without_rv(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    v
}

fn port_of(s: &Service) -> i32 {
    s.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map_or(0, |p| p[0].port)
}

/// A reflector driven by the real watcher on a background task.
struct Reflected<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    errors: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K: Resource<DynamicType = ()> + 'static> Drop for Reflected<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Reflected<K> {
    /// "ns/name" (or "name") of every object in the store.
    fn names(&self) -> BTreeSet<String> {
        self.store
            .state()
            .iter()
            .map(|o| match o.namespace() {
                Some(ns) => format!("{ns}/{}", o.name_any()),
                None => o.name_any(),
            })
            .collect()
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    async fn ready(&self) {
        tokio::time::timeout(T, self.store.wait_until_ready())
            .await
            .expect("store not ready in time")
            .expect("writer dropped");
    }

    async fn wait_names(&self, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let ok = wait_until(T, || self.names() == want).await;
        assert!(
            ok,
            "store has {:?}, want {want:?}; errors {:?}",
            self.names(),
            self.errors()
        );
    }
}

fn reflect<K>(api: Api<K>, config: watcher::Config, backoff: bool) -> Reflected<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let stream: BoxStream<'static, watcher::Result<watcher::Event<K>>> = if backoff {
        watcher(api, config).default_backoff().boxed()
    } else {
        // Without a backoff, a watcher whose requests keep failing retries at once, in a loop
        // that never yields: it once held a worker (and the runtime's timer) for minutes, so
        // that no deadline of the test fired. A short pause after each error keeps the retries
        // prompt (the tests count requests) and lets the deadlines work.
        watcher(api, config)
            .then(|event| async move {
                if event.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                event
            })
            .boxed()
    };
    let errs = errors.clone();
    let task = tokio::spawn(reflector::reflector(writer, stream).for_each(move |event| {
        if let Err(e) = event {
            // Bounded: a test that fails on a loop of errors says which, without eating memory.
            let mut errs = errs.lock().unwrap();
            if errs.len() < 100 {
                errs.push(e.to_string());
            }
        }
        futures::future::ready(())
    }));
    Reflected {
        store,
        errors,
        task,
    }
}

fn api_status(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API status error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_matches_recorded_shape() {
    let fake = FakeApiServer::start().await;
    let recorded = fixture!("list-services.json");
    let rv = fake.apply_list(&recorded);

    let raw = fake.raw_get("/api/v1/services", T).await;
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("content-type"), Some("application/json"));
    assert!(
        raw.header("content-length").is_some(),
        "a list has a content-length"
    );
    let body = raw.json();
    assert_eq!(body["kind"], "ServiceList");
    assert_eq!(body["apiVersion"], "v1");
    assert_eq!(body["metadata"], json!({ "resourceVersion": rv }));
    let items = body["items"].as_array().unwrap();
    let want = recorded["items"].as_array().unwrap();
    assert_eq!(items.len(), want.len());
    for (got, want) in items.iter().zip(want) {
        assert!(got.get("kind").is_none() && got.get("apiVersion").is_none());
        assert_eq!(without_rv(got), without_rv(want));
    }

    // The same through kube.
    let api: Api<Service> = Api::all(fake.client());
    let list = api.list(&Default::default()).await.unwrap();
    assert_eq!(list.metadata.resource_version.as_deref(), Some(rv.as_str()));
    let names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["kubernetes", "kubia", "kubia-multi"]);
    let multi = &list.items[2];
    let spec = multi.spec.as_ref().unwrap();
    assert!(spec.session_affinity_config.is_some());
    assert_eq!(
        serde_json::to_value(&spec.ports.as_ref().unwrap()[0].target_port).unwrap(),
        json!("http")
    );
    // Every item carries its own resourceVersion, all <= the list's.
    let list_rv: u64 = rv.parse().unwrap();
    for item in &list.items {
        let item_rv: u64 = item.resource_version().unwrap().parse().unwrap();
        assert!(item_rv <= list_rv);
    }

    // EndpointSlices, including hand-made ones with ready-only conditions.
    let recorded = fixture!("list-endpointslices.json");
    fake.apply_list(&recorded);
    let raw = fake
        .raw_get("/apis/discovery.k8s.io/v1/endpointslices", T)
        .await
        .json();
    assert_eq!(raw["kind"], "EndpointSliceList");
    assert_eq!(raw["apiVersion"], "discovery.k8s.io/v1");
    let got: Vec<Value> = raw["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(without_rv)
        .collect();
    let want: Vec<Value> = recorded["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(without_rv)
        .collect();
    assert_eq!(got, want);
    let slices: Api<EndpointSlice> = Api::all(fake.client());
    let list = slices.list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
    let cond = &list.items[0].endpoints[0].conditions.as_ref().unwrap();
    assert_eq!((cond.ready, cond.serving), (Some(true), None));

    // Namespaced list.
    fake.apply(json!({"kind": "Service", "metadata": {"name": "dns", "namespace": "kube-system"}, "spec": {}}));
    let ns: Api<Service> = Api::namespaced(fake.client(), "kube-system");
    let names: Vec<String> = ns
        .list(&Default::default())
        .await
        .unwrap()
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(names, ["dns"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pagination_is_a_consistent_snapshot() {
    let fake = FakeApiServer::start().await;
    for name in ["a", "b", "c"] {
        fake.apply(svc(name, json!({}), 80));
    }
    let api: Api<Service> = Api::all(fake.client());

    // kube's Api::list does not follow continue tokens: page by hand.
    let p1 = api.list(&ListParams::default().limit(1)).await.unwrap();
    let rv = p1.metadata.resource_version.clone().unwrap();
    assert_eq!(p1.items.len(), 1);
    assert_eq!(p1.items[0].name_any(), "a");
    assert_eq!(p1.metadata.remaining_item_count, Some(2));
    let cont = p1.metadata.continue_.clone().expect("continue token");

    // Changes after the first page are not seen by the following pages.
    fake.delete("Service", "default", "c");
    fake.apply(svc("d", json!({}), 80));
    fake.apply(svc("b", json!({}), 81));

    let p2 = api
        .list(&ListParams::default().limit(1).continue_token(&cont))
        .await
        .unwrap();
    assert_eq!(p2.metadata.resource_version.as_deref(), Some(rv.as_str()));
    assert_eq!(p2.items[0].name_any(), "b");
    assert_eq!(port_of(&p2.items[0]), 80, "b as of the snapshot");
    assert_eq!(p2.metadata.remaining_item_count, Some(1));
    let cont = p2.metadata.continue_.clone().expect("continue token");
    let p3 = api
        .list(&ListParams::default().limit(1).continue_token(&cont))
        .await
        .unwrap();
    assert_eq!(p3.items[0].name_any(), "c", "deleted after the snapshot");
    assert_eq!(p3.metadata.continue_, None);
    assert_eq!(p3.metadata.remaining_item_count, None);

    // A fresh list sees the changes; an Exact list at the old RV does not.
    let now: Vec<String> = api
        .list(&Default::default())
        .await
        .unwrap()
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(now, ["a", "b", "d"]);
    let then = api
        .list(&ListParams::default().at(&rv).matching(VersionMatch::Exact))
        .await
        .unwrap();
    let names: Vec<String> = then.iter().map(|s| s.name_any()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(then.metadata.resource_version.as_deref(), Some(rv.as_str()));

    // Page 1 of the recorded EndpointSlice list.
    let fake = FakeApiServer::start().await;
    fake.apply_list(&fixture!("list-endpointslices.json"));
    let recorded = fixture!("list-endpointslices-page1.json");
    let page = fake
        .raw_get("/apis/discovery.k8s.io/v1/endpointslices?limit=1", T)
        .await
        .json();
    let keys = |v: &Value| {
        v["metadata"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&page), keys(&recorded));
    assert_eq!(page["metadata"]["remainingItemCount"], 1);
    assert_eq!(
        without_rv(&page["items"][0]),
        without_rv(&recorded["items"][0])
    );
    let ours = continue_token_json(page["metadata"]["continue"].as_str().unwrap()).unwrap();
    let theirs = continue_token_json(recorded["metadata"]["continue"].as_str().unwrap()).unwrap();
    assert_eq!(ours["v"], theirs["v"]);
    assert_eq!(ours["start"], theirs["start"]);
    assert_eq!(
        ours["rv"].to_string(),
        page["metadata"]["resourceVersion"].as_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_lists_and_watches_get_410() {
    let fake = FakeApiServer::start().await;
    fake.apply_list(&fixture!("list-endpointslices.json"));
    fake.apply_list(&fixture!("list-services.json"));
    let slices: Api<EndpointSlice> = Api::all(fake.client());
    let services: Api<Service> = Api::all(fake.client());
    let p1 = slices.list(&ListParams::default().limit(1)).await.unwrap();
    let cont = p1.metadata.continue_.unwrap();
    let old = fake.resource_version();
    fake.apply(svc("x", json!({}), 80));
    fake.compact();

    // Expired continue token: 410 with a fresh (inconsistent) token.
    let err = slices
        .list(&ListParams::default().limit(1).continue_token(&cont))
        .await
        .unwrap_err();
    assert_eq!(api_status(err), (410, "Expired".to_string()));
    let raw = fake
        .raw_get(
            &format!("/apis/discovery.k8s.io/v1/endpointslices?limit=1&continue={cont}"),
            T,
        )
        .await;
    assert_eq!(raw.status, 410);
    let mut body = raw.json();
    let mut recorded = fixture!("list-endpointslices-expired-continue.json");
    let fresh = body["metadata"]["continue"].as_str().unwrap().to_string();
    assert_eq!(
        continue_token_json(&fresh),
        continue_token_json(recorded["metadata"]["continue"].as_str().unwrap()),
        "the fresh token continues after the same key, at rv -1"
    );
    body["metadata"].as_object_mut().unwrap().remove("continue");
    recorded["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("continue");
    assert_eq!(body, recorded);
    let rest = slices
        .list(&ListParams::default().limit(1).continue_token(&fresh))
        .await
        .unwrap();
    assert_eq!(rest.items[0].name_any(), "kubia-x7k2p");

    // Exact list at a compacted RV.
    let raw = fake
        .raw_get(
            &format!("/api/v1/services?resourceVersion={old}&resourceVersionMatch=Exact"),
            T,
        )
        .await;
    assert_eq!(raw.status, 410);
    assert_eq!(raw.json(), fixture!("list-services-410.json"));
    let err = services
        .list(&ListParams::default().at(&old).matching(VersionMatch::Exact))
        .await
        .unwrap_err();
    assert_eq!(api_status(err).0, 410);

    // Watch from a compacted RV: HTTP 200 and one ERROR event, then the end (the server closes
    // the stream itself, long before the request's 75 s timeout or our deadline).
    let raw = fake
        .raw_get(
            &format!("/api/v1/services?watch=1&resourceVersion={old}&allowWatchBookmarks=true&timeoutSeconds=75"),
            T,
        )
        .await;
    assert_eq!(raw.status, 200);
    assert!(raw.closed && raw.chunked_end);
    assert_eq!(raw.lines(), fixture_lines!("watch-services-410.jsonl"));
    let raw = fake
        .raw_get(
            &format!("/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion={old}"),
            T,
        )
        .await;
    assert_eq!(
        raw.lines(),
        fixture_lines!("watch-endpointslices-410.jsonl")
    );

    // kube-client surfaces it as a WatchEvent::Error.
    let mut stream = services
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(T, stream.next()).await.unwrap() {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(T, stream.next())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_one_object_and_404() {
    let fake = FakeApiServer::start().await;
    let recorded = fixture!("get-node.json");
    fake.apply(recorded.clone());

    let raw = fake.raw_get("/api/v1/nodes/node-a", T).await;
    assert_eq!(raw.status, 200);
    assert_eq!(without_rv(&raw.json()), without_rv(&recorded));
    let nodes: Api<Node> = Api::all(fake.client());
    let node = nodes.get("node-a").await.unwrap();
    assert_eq!(
        node.labels()
            .get("topology.kubernetes.io/zone")
            .map(String::as_str),
        Some("zone-1")
    );
    assert_eq!(
        node.spec.unwrap().pod_cidrs.unwrap(),
        ["172.17.0.0/24".to_string()]
    );

    let raw = fake
        .raw_get("/api/v1/namespaces/default/services/nope", T)
        .await;
    assert_eq!(raw.status, 404);
    assert_eq!(raw.json(), fixture!("get-service-404.json"));
    let services: Api<Service> = Api::namespaced(fake.client(), "default");
    let err = services.get("nope").await.unwrap_err();
    assert_eq!(api_status(err), (404, "NotFound".to_string()));
    assert!(services.get_opt("nope").await.unwrap().is_none());
    let slices: Api<EndpointSlice> = Api::namespaced(fake.client(), "default");
    let err = slices.get("nope").await.unwrap_err();
    assert_eq!(api_status(err).0, 404);

    // A resource the fake does not serve.
    let raw = fake.raw_get("/api/v1/pods", T).await;
    assert_eq!(
        (raw.status, raw.json()["reason"].clone()),
        (404, json!("NotFound"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stream_matches_recorded_shape() {
    let fake = FakeApiServer::start_with(FakeOptions {
        bookmark_interval: Some(Duration::from_millis(200)),
        ..FakeOptions::default()
    })
    .await;

    for (recorded, path, kind) in [
        (
            fixture_lines!("watch-services.jsonl"),
            "/api/v1/services",
            "Service",
        ),
        (
            fixture_lines!("watch-endpointslices.jsonl"),
            "/apis/discovery.k8s.io/v1/endpointslices",
            "EndpointSlice",
        ),
    ] {
        // Replay the recorded changes into the fake.
        let start = fake.resource_version();
        let mut rvs = Vec::new();
        for event in &recorded {
            let obj = &event["object"];
            match event["type"].as_str().unwrap() {
                "ADDED" | "MODIFIED" => rvs.push(fake.apply(obj.clone())),
                "DELETED" => {
                    let meta = &obj["metadata"];
                    assert!(fake.delete(
                        kind,
                        meta["namespace"].as_str().unwrap(),
                        meta["name"].as_str().unwrap()
                    ));
                    rvs.push(fake.resource_version());
                }
                _ => {}
            }
        }

        let began = Instant::now();
        let raw = fake
            .raw_get(
                &format!("{path}?watch=1&resourceVersion={start}&allowWatchBookmarks=true&timeoutSeconds=1"),
                T,
            )
            .await;
        let took = began.elapsed();
        assert_eq!(raw.status, 200);
        assert_eq!(raw.header("content-type"), Some("application/json"));
        assert_eq!(raw.header("content-length"), None);
        assert_eq!(raw.header("transfer-encoding"), Some("chunked"));
        assert!(
            raw.closed && raw.chunked_end,
            "the server ends the watch cleanly"
        );
        // The server honours timeoutSeconds=1: it ends the watch itself (`closed` above, well
        // before our deadline T) and not before the second is up. Only a lower bound: a slow
        // machine cannot make it fail.
        assert!(took >= Duration::from_millis(900), "{took:?}");

        let lines = raw.lines();
        let n = rvs.len();
        let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
        let want: Vec<&str> = recorded[..n]
            .iter()
            .map(|l| l["type"].as_str().unwrap())
            .collect();
        assert_eq!(types[..n], want[..]);
        assert!(
            types[n..].iter().all(|t| *t == "BOOKMARK") && types.len() >= n + 2,
            "{types:?}"
        );
        for i in 0..n {
            assert_eq!(
                lines[i]["object"]["metadata"]["resourceVersion"],
                json!(rvs[i])
            );
            assert_eq!(
                without_rv(&lines[i]["object"]),
                without_rv(&recorded[i]["object"])
            );
        }
        // Bookmarks: only a resourceVersion (the current one) and zero-valued fields.
        let bookmark = &lines[n];
        assert_eq!(
            bookmark["object"]["metadata"]["resourceVersion"],
            json!(fake.resource_version())
        );
        assert_eq!(bookmark["type"], "BOOKMARK");
        assert_eq!(
            without_rv(&bookmark["object"]),
            without_rv(&recorded[n]["object"])
        );
    }
}

// ---------------------------------------------------------------------------
// kube-runtime's watcher and reflector
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_and_reflector_follow_changes() {
    let fake = FakeApiServer::start().await;
    fake.apply(svc("a", json!({}), 80));
    fake.apply(svc("b", json!({}), 80));
    let list_rv = fake.resource_version();
    let r = reflect(
        Api::<Service>::all(fake.client()),
        watcher::Config::default(),
        false,
    );
    r.ready().await;
    r.wait_names(&["default/a", "default/b"]).await;

    fake.apply(svc("c", json!({}), 80));
    r.wait_names(&["default/a", "default/b", "default/c"]).await;
    fake.apply(svc("a", json!({}), 8443));
    let updated = wait_until(T, || {
        r.store
            .state()
            .iter()
            .any(|s| s.name_any() == "a" && port_of(s) == 8443)
    })
    .await;
    assert!(updated);
    fake.delete("Service", "default", "a");
    r.wait_names(&["default/b", "default/c"]).await;
    assert!(r.errors().is_empty(), "{:?}", r.errors());

    // Exactly the requests kube-runtime makes: one paged list, one watch from its RV.
    let log = fake.request_log();
    // (kube-core builds the query from "path?", hence the empty first pair.)
    assert_eq!(log[0], "GET /api/v1/services?&limit=500");
    assert_eq!(
        log[1],
        format!(
            "GET /api/v1/services?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion={list_rv}"
        )
    );
    assert_eq!(fake.requests("Service"), (1, 1));

    // EndpointSlices through a watcher with the default backoff.
    fake.apply_list(&fixture!("list-endpointslices.json"));
    let slices = reflect(
        Api::<EndpointSlice>::all(fake.client()),
        watcher::Config::default(),
        true,
    );
    slices.ready().await;
    slices
        .wait_names(&["default/kubia-multi-4mzq8", "default/kubia-x7k2p"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_compaction() {
    relist_after_compaction(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_with_backoff_relists_after_compaction() {
    relist_after_compaction(true).await;
}

async fn relist_after_compaction(backoff: bool) {
    // No bookmarks, so the watcher's RV stays at its last Service event.
    let fake = FakeApiServer::start_with(FakeOptions {
        bookmark_interval: None,
        ..FakeOptions::default()
    })
    .await;
    fake.apply(svc("a", json!({}), 80));
    fake.apply(svc("b", json!({}), 80));
    let r = reflect(
        Api::<Service>::all(fake.client()),
        watcher::Config::default(),
        backoff,
    );
    r.ready().await;
    assert!(wait_until(T, || fake.open_watches("Service") == 1).await);

    // Another kind moves the global RV on; compaction then makes the Service
    // watcher's RV too old, and its watch is dropped.
    fake.apply(node("node-a", "z1"));
    fake.hold_lists("Service", true);
    fake.compact();
    fake.drop_watches();

    // The re-watch gets the 410 ERROR event, the watcher lists again (held).
    assert!(
        wait_until(T, || fake.requests("Service").0 == 2).await,
        "no re-list: {:?}",
        fake.request_log()
    );
    assert_eq!(fake.requests("Service").1, 2);
    // Changes while the watch is down.
    fake.delete("Service", "default", "a");
    fake.apply(svc("c", json!({}), 80));
    fake.apply(svc("b", json!({}), 81));
    assert_eq!(
        r.names(),
        ["default/a", "default/b"].map(String::from).into()
    );

    fake.hold_lists("Service", false);
    r.wait_names(&["default/b", "default/c"]).await;
    assert!(
        r.store
            .state()
            .iter()
            .any(|s| s.name_any() == "b" && port_of(s) == 81),
        "b modified while the watch was down"
    );
    assert!(wait_until(T, || fake.requests("Service") == (2, 3)).await);
    let errors = r.errors();
    assert!(
        errors.iter().any(|e| e.contains("too old")),
        "the 410 reaches the watcher as an error: {errors:?}"
    );

    // And it keeps following.
    fake.apply(svc("d", json!({}), 80));
    r.wait_names(&["default/b", "default/c", "default/d"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_keep_the_watcher_resource_version_fresh() {
    let fake = FakeApiServer::start_with(FakeOptions {
        bookmark_interval: Some(Duration::from_millis(100)),
        ..FakeOptions::default()
    })
    .await;
    fake.apply(svc("a", json!({}), 80));
    let with = reflect(
        Api::<Service>::all(fake.client()),
        watcher::Config::default(),
        false,
    );
    let fake2 = FakeApiServer::start_with(FakeOptions {
        bookmark_interval: Some(Duration::from_millis(100)),
        ..FakeOptions::default()
    })
    .await;
    fake2.apply(svc("a", json!({}), 80));
    let without = reflect(
        Api::<Service>::all(fake2.client()),
        watcher::Config::default().disable_bookmarks(),
        false,
    );
    with.ready().await;
    without.ready().await;
    assert!(
        wait_until(T, || fake.open_watches("Service") == 1
            && fake2.open_watches("Service") == 1)
        .await
    );

    // Other kinds move the RV on; only bookmarks tell the Service watcher.
    for f in [&fake, &fake2] {
        f.apply(node("node-a", "z1"));
        f.apply(node("node-b", "z1"));
    }
    let current = fake.resource_version();
    assert!(wait_until(T, || fake.last_bookmark("Service") == Some(current.clone())).await);
    // Time for the client to read it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for f in [&fake, &fake2] {
        f.compact();
        f.drop_watches();
    }

    // With bookmarks the watch resumes from the bookmarked (still valid) RV.
    assert!(
        wait_until(T, || fake.requests("Service").1 == 2
            && fake.open_watches("Service") == 1)
        .await
    );
    // Without, it is too old: 410 and a re-list.
    assert!(wait_until(T, || fake2.requests("Service") == (2, 3)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.requests("Service"), (1, 2));
    assert!(
        !with.errors().iter().any(|e| e.contains("too old")),
        "{:?}",
        with.errors()
    );
    assert!(without.errors().iter().any(|e| e.contains("too old")));

    fake.apply(svc("b", json!({}), 80));
    with.wait_names(&["default/a", "default/b"]).await;
    assert!(
        with.errors().is_empty(),
        "bookmarks and a dropped watch are not errors: {:?}",
        with.errors()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_watch_timeout_only_rewatches() {
    let fake = FakeApiServer::start_with(FakeOptions {
        max_watch_timeout: Duration::from_millis(700),
        ..FakeOptions::default()
    })
    .await;
    fake.apply(svc("a", json!({}), 80));
    let r = reflect(
        Api::<Service>::all(fake.client()),
        watcher::Config::default(),
        false,
    );
    r.ready().await;
    assert!(wait_until(T, || fake.requests("Service").1 >= 4).await);
    assert_eq!(
        fake.requests("Service").0,
        1,
        "no re-list after a watch timeout"
    );
    fake.apply(svc("b", json!({}), 80));
    r.wait_names(&["default/a", "default/b"]).await;
    assert!(r.errors().is_empty(), "{:?}", r.errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_recovers_from_an_outage_with_backoff() {
    let fake = FakeApiServer::start().await;
    fake.apply(svc("a", json!({}), 80));
    let r = reflect(
        Api::<Service>::all(fake.client()),
        watcher::Config::default(),
        true,
    );
    r.ready().await;
    assert!(wait_until(T, || fake.open_watches("Service") == 1).await);

    fake.set_available(false);
    fake.apply(svc("b", json!({}), 80));
    fake.delete("Service", "default", "a");
    assert!(
        wait_until(T, || !r.errors().is_empty()).await,
        "the watcher sees the outage"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(r.names(), ["default/a"].map(String::from).into());
    let watches_while_down = fake.requests("Service").1;
    fake.set_available(true);

    r.wait_names(&["default/b"]).await;
    let (lists, watches) = fake.requests("Service");
    assert_eq!(lists, 1, "resumed from its RV without a re-list");
    assert!(watches > watches_while_down);
    let errors = r.errors();
    assert!(
        errors
            .iter()
            .all(|e| e.contains("failed to start watching") || e.contains("watch stream failed")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_503_outage_is_absorbed_by_the_client_retry_layer() {
    let fake = FakeApiServer::start().await;
    fake.set_outage(Outage::ServiceUnavailable);
    fake.apply(svc("a", json!({}), 80));
    let r = reflect(
        Api::<Service>::all(fake.client()),
        watcher::Config::default(),
        true,
    );
    r.ready().await;
    assert!(wait_until(T, || fake.open_watches("Service") == 1).await);

    fake.set_available(false);
    fake.apply(svc("b", json!({}), 80));
    let refused = || {
        fake.request_log()
            .iter()
            .filter(|l| l.contains("watch=true"))
            .count()
            .saturating_sub(fake.requests("Service").1)
    };
    assert!(
        wait_until(T, || refused() >= 2).await,
        "503s retried by kube-client"
    );
    fake.set_available(true);
    r.wait_names(&["default/a", "default/b"]).await;
    assert!(
        r.errors().is_empty(),
        "the watcher never saw the 503s: {:?}",
        r.errors()
    );
    assert_eq!(fake.requests("Service").0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_field_selector() {
    let fake = FakeApiServer::start().await;
    fake.apply(fixture!("get-node.json"));
    fake.apply(node("node-b", "z2"));
    let r = reflect(
        Api::<Node>::all(fake.client()),
        watcher::Config::default().fields("metadata.name=node-a"),
        false,
    );
    r.ready().await;
    r.wait_names(&["node-a"]).await;
    let a = r.store.state()[0].clone();
    assert_eq!(
        a.spec.as_ref().unwrap().pod_cidr.as_deref(),
        Some("172.17.0.0/24")
    );

    fake.apply(node("node-b", "z3"));
    fake.apply(node("node-c", "z1"));
    fake.apply(node("node-a", "z9"));
    let seen = wait_until(T, || {
        r.store.state().iter().any(|n| {
            n.labels()
                .get("topology.kubernetes.io/zone")
                .map(String::as_str)
                == Some("z9")
        })
    })
    .await;
    assert!(seen);
    assert_eq!(r.names(), ["node-a".to_string()].into());
    for l in fake.request_log() {
        assert!(l.contains("fieldSelector=metadata.name%3Dnode-a"), "{l}");
    }

    let nodes: Api<Node> = Api::all(fake.client());
    let only_b = nodes
        .list(&ListParams::default().fields("metadata.name=node-b"))
        .await
        .unwrap();
    assert_eq!(only_b.items.len(), 1);
    assert_eq!(only_b.items[0].name_any(), "node-b");
    let not_b = nodes
        .list(&ListParams::default().fields("metadata.name!=node-b"))
        .await
        .unwrap();
    assert_eq!(not_b.items.len(), 2);
    let err = nodes
        .list(&ListParams::default().fields("spec.unknown=x"))
        .await
        .unwrap_err();
    assert_eq!(api_status(err), (400, "BadRequest".to_string()));
    fake.delete("Node", "", "node-a");
    r.wait_names(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selectors_move_objects_in_and_out() {
    let fake = FakeApiServer::start().await;
    fake.apply(svc("a", json!({"app": "demo"}), 80));
    fake.apply(svc("b", json!({"app": "other"}), 80));
    let r = reflect(
        Api::<Service>::all(fake.client()),
        watcher::Config::default().labels("app=demo"),
        false,
    );
    r.ready().await;
    r.wait_names(&["default/a"]).await;
    fake.apply(svc("b", json!({"app": "demo"}), 80));
    r.wait_names(&["default/a", "default/b"]).await;
    fake.apply(svc("a", json!({"app": "other"}), 80));
    r.wait_names(&["default/b"]).await;
    assert!(r.errors().is_empty(), "{:?}", r.errors());

    let api: Api<Service> = Api::all(fake.client());
    let both = api
        .list(&ListParams::default().labels("app in (demo,other),!missing"))
        .await
        .unwrap();
    assert_eq!(both.items.len(), 2);
    let err = api
        .list(&ListParams::default().labels("app in (demo"))
        .await
        .unwrap_err();
    assert_eq!(api_status(err).0, 400);
    // Still serving.
    assert_eq!(api.list(&Default::default()).await.unwrap().items.len(), 2);
}

/// kube-proxy's selector (`!a,!b`: neither label present), on a list and on a watch resumed
/// from an older resourceVersion: as apiserver's cacher, a change is sent only when the old or
/// the new object matches; an object whose labels move it out of the selection comes as
/// DELETED (its old content, with the new resourceVersion), one moving in as ADDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxy_selector_on_lists_and_replayed_watches() {
    let selector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
    let fake = FakeApiServer::start().await;
    fake.apply(svc("mine", json!({"app": "a"}), 80));
    fake.apply(svc(
        "foreign",
        json!({"service.kubernetes.io/service-proxy-name": "other"}),
        80,
    ));
    fake.apply(svc(
        "headless",
        json!({"service.kubernetes.io/headless": ""}),
        80,
    ));
    let api: Api<Service> = Api::all(fake.client());
    let listed = api
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap();
    let names: Vec<String> = listed.items.iter().map(|s| s.name_any()).collect();
    assert_eq!(names, ["mine"]);

    let from = fake.resource_version();
    // Out, in, a change outside the selection, a change inside it, a deletion outside it.
    fake.apply(svc(
        "mine",
        json!({"service.kubernetes.io/service-proxy-name": "other"}),
        80,
    ));
    let left_at = fake.resource_version();
    fake.apply(svc("foreign", json!({}), 80));
    fake.apply(svc(
        "headless",
        json!({"service.kubernetes.io/headless": "", "x": "y"}),
        80,
    ));
    fake.apply(svc("foreign", json!({"x": "y"}), 81));
    fake.delete("Service", "default", "headless");
    let raw = fake
        .raw_get(
            &format!(
                "/api/v1/services?watch=1&resourceVersion={from}&timeoutSeconds=1&labelSelector={}",
                selector.replace('!', "%21").replace(',', "%2C")
            ),
            T,
        )
        .await;
    assert_eq!(raw.status, 200);
    let events: Vec<(String, String)> = raw
        .lines()
        .iter()
        .map(|l| {
            (
                l["type"].as_str().unwrap().to_string(),
                l["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    let want = [
        ("DELETED", "mine"),
        ("ADDED", "foreign"),
        ("MODIFIED", "foreign"),
    ];
    assert_eq!(
        events,
        want.map(|(t, n)| (t.to_string(), n.to_string())),
        "{:?}",
        raw.lines()
    );
    let deleted = &raw.lines()[0]["object"];
    assert_eq!(
        deleted["metadata"]["labels"],
        json!({"app": "a"}),
        "the object as it was before it left"
    );
    assert_eq!(deleted["metadata"]["resourceVersion"], json!(left_at));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_list_keeps_the_store_not_ready() {
    let fake = FakeApiServer::start().await;
    fake.apply(svc("a", json!({}), 80));
    fake.hold_lists("Service", true);
    let r = reflect(
        Api::<Service>::all(fake.client()),
        watcher::Config::default(),
        false,
    );
    assert!(wait_until(T, || fake.requests("Service").0 == 1).await);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), r.store.wait_until_ready())
            .await
            .is_err(),
        "ready while the list is held"
    );
    assert!(r.store.is_empty());
    fake.apply(svc("b", json!({}), 80));

    fake.hold_lists("Service", false);
    r.ready().await;
    r.wait_names(&["default/a", "default/b"]).await;
    assert!(wait_until(T, || fake.requests("Service") == (1, 1)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_initial_events() {
    let fake = FakeApiServer::start().await;
    fake.apply(svc("a", json!({}), 80));
    fake.apply(svc("b", json!({}), 80));
    let r = reflect(
        Api::<Service>::all(fake.client()),
        watcher::Config::default().streaming_lists(),
        false,
    );
    r.ready().await;
    r.wait_names(&["default/a", "default/b"]).await;
    assert_eq!(fake.requests("Service"), (0, 1));
    assert!(fake.request_log()[0].contains("sendInitialEvents=true"));
    fake.apply(svc("c", json!({}), 80));
    r.wait_names(&["default/a", "default/b", "default/c"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_and_outages_on_the_wire() {
    let fake = FakeApiServer::start().await;
    fake.apply(svc("a", json!({}), 80));
    let rv = fake.resource_version();

    // drop_watches: the connection closes mid-stream, without the last chunk.
    let watch = tokio::spawn({
        let fake = fake.clone();
        async move {
            fake.raw_get(&format!("/api/v1/services?watch=1&resourceVersion={rv}"), T)
                .await
        }
    });
    assert!(wait_until(T, || fake.open_watches("Service") == 1).await);
    fake.apply(svc("b", json!({}), 80));
    fake.drop_watches();
    let raw = watch.await.unwrap();
    assert_eq!(raw.status, 200);
    assert!(raw.closed && !raw.chunked_end, "{raw:?}");
    assert_eq!(raw.lines().len(), 1);
    assert_eq!(fake.open_watches("Service"), 0);

    // Down (default): connections are closed without a response.
    fake.set_available(false);
    let raw = fake.raw_get("/api/v1/services", T).await;
    assert!(raw.closed && raw.status == 0, "{raw:?}");
    let err = Api::<Service>::all(fake.client())
        .list(&Default::default())
        .await
        .unwrap_err();
    assert!(!matches!(err, kube::Error::Api(_)), "{err:?}");

    // Down with 503s.
    fake.set_outage(Outage::ServiceUnavailable);
    let raw = fake.raw_get("/api/v1/services", T).await;
    assert_eq!(raw.status, 503);
    assert_eq!(raw.json()["reason"], "ServiceUnavailable");

    fake.set_available(true);
    let raw = fake.raw_get("/api/v1/services", T).await;
    assert_eq!(raw.status, 200);
    assert_eq!(raw.json()["items"].as_array().unwrap().len(), 2);
}
