//! An in-process fake kube-apiserver for driving the real kube-rs client.
//!
//! It serves Services, EndpointSlices and Nodes over plain HTTP/1.1 on
//! 127.0.0.1 (random port) and speaks the list/watch protocol the way a real
//! kube-apiserver does (see `tests/fixtures/apiserver/README.md` for the
//! recorded responses it imitates):
//!
//! * lists: `kind: XList`, list `metadata.resourceVersion`, items without
//!   kind/apiVersion, `limit`/`continue` paging over a consistent snapshot,
//!   `remainingItemCount`, 410 `Expired` for a compacted `continue` token or an
//!   `Exact` resourceVersion, `content-length` set;
//! * watches: HTTP 200, chunked (no content-length), one JSON event a line;
//!   replay of the event log after the given resourceVersion then live events;
//!   a single `ERROR` event carrying a 410 `Expired` Status when the
//!   resourceVersion was compacted away; periodic `BOOKMARK`s when
//!   `allowWatchBookmarks` is set; `sendInitialEvents` (streaming lists) with the
//!   `k8s.io/initial-events-end` bookmark; the stream ends after
//!   `timeoutSeconds` (capped by [`FakeOptions::max_watch_timeout`]);
//! * `fieldSelector` on `metadata.name` / `metadata.namespace`, equality and
//!   set based `labelSelector`s (a selector that cannot be parsed gets a 400
//!   Status); objects moving in or out of a selector are sent as ADDED/DELETED;
//! * GET of one object (404 `NotFound` Status when missing).
//!
//! Tests drive it through [`FakeApiServer`]: `apply`/`delete` objects (one
//! global resourceVersion counter across kinds, as etcd), `compact` the event
//! log, `drop_watches`, take the server down with `set_available(false)`,
//! hold LIST requests, and count requests.
//!
//! Include it with an `#[allow(dead_code)]` on the `mod` item (or from
//! `tests/common`, which allows dead code): no test uses all of it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Query, State as AxState};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// The resource kinds the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::ServiceCidr,
    ];

    /// Accepts the kind ("Service"), the plural ("services") or the list kind
    /// ("ServiceList"), case-insensitively.
    pub fn parse(s: &str) -> Option<Kind> {
        let s = s.to_ascii_lowercase();
        let s = s.strip_suffix("list").unwrap_or(&s);
        match s {
            "service" | "services" | "svc" => Some(Kind::Service),
            "endpointslice" | "endpointslices" => Some(Kind::EndpointSlice),
            "node" | "nodes" => Some(Kind::Node),
            "servicecidr" | "servicecidrs" => Some(Kind::ServiceCidr),
            _ => None,
        }
    }

    fn idx(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::ServiceCidr => "networking.k8s.io/v1",
        }
    }

    fn group(self) -> Option<&'static str> {
        match self {
            Kind::EndpointSlice => Some("discovery.k8s.io"),
            Kind::ServiceCidr => Some("networking.k8s.io"),
            Kind::Service | Kind::Node => None,
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::ServiceCidr => "servicecidrs",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::ServiceCidr)
    }

    /// The zero-valued fields a real apiserver serialises after `metadata` in
    /// a BOOKMARK object (Go structs with no `omitempty`), as recorded.
    fn bookmark_tail(self) -> &'static str {
        match self {
            Kind::Service => r#","spec":{},"status":{"loadBalancer":{}}"#,
            Kind::EndpointSlice => r#","addressType":"","endpoints":null,"ports":null"#,
            Kind::ServiceCidr => r#","spec":{},"status":{}"#,
            Kind::Node => concat!(
                r#","spec":{},"status":{"daemonEndpoints":{"kubeletEndpoint":{"Port":0}},"#,
                r#""nodeInfo":{"machineID":"","systemUUID":"","bootID":"","kernelVersion":"","#,
                r#""osImage":"","containerRuntimeVersion":"","kubeletVersion":"","#,
                r#""kubeProxyVersion":"","operatingSystem":"","architecture":""}}"#
            ),
        }
    }
}

/// What the server does to requests while it is down (see
/// [`FakeApiServer::set_available`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// New connections are accepted and closed at once, open connections
    /// (idle keep-alive ones, held lists, watches) are closed: like an
    /// apiserver that is restarting. The client sees transport errors.
    CloseConnections,
    /// Requests get a 503 `ServiceUnavailable` Status; open watches are ended
    /// abruptly. Note that kube-client's default retry layer retries 503s
    /// itself, so short outages may be invisible to the watcher.
    ServiceUnavailable,
}

/// Knobs fixed at start.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// How often an open watch with `allowWatchBookmarks=true` gets a BOOKMARK
    /// event. `None`: never.
    pub bookmark_interval: Option<Duration>,
    /// Upper bound on a watch's lifetime, whatever `timeoutSeconds` asks for
    /// (also used when the request has no or a zero `timeoutSeconds`).
    pub max_watch_timeout: Duration,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            bookmark_interval: Some(Duration::from_secs(1)),
            max_watch_timeout: Duration::from_secs(60),
        }
    }
}

/// Handle on a running fake apiserver. Cheap to clone; the server task runs
/// on the tokio runtime that called [`FakeApiServer::start`] and stops with it.
#[derive(Clone)]
pub struct FakeApiServer {
    inner: Arc<Inner>,
}

/// A response read with [`FakeApiServer::raw_get`].
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: String,
    /// The server closed the connection before the read deadline.
    pub closed: bool,
    /// The body was chunked and the terminating zero-length chunk arrived
    /// (a clean end, as opposed to a connection closed mid-stream).
    pub chunked_end: bool,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", self.body))
    }

    /// The body as JSON lines (a watch stream); an incomplete last line is skipped.
    pub fn lines(&self) -> Vec<Value> {
        self.body
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line ({e}): {l}")))
            .collect()
    }
}

impl FakeApiServer {
    /// Binds 127.0.0.1:0 and spawns the server with default options.
    pub async fn start() -> FakeApiServer {
        Self::start_with(FakeOptions::default()).await
    }

    pub async fn start_with(opts: FakeOptions) -> FakeApiServer {
        let tcp = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = tcp.local_addr().expect("local_addr");
        let inner = Arc::new(Inner {
            state: Mutex::new(State::new()),
            changed: watch::channel(0).0,
            kill_conns: watch::channel(0).0,
            opts,
            addr,
        });
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let listener = FakeListener {
            tcp,
            inner: inner.clone(),
        };
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeApiServer { inner }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// A `kube::Config` pointing at the fake (defaults otherwise, including
    /// kube-client's retry layer).
    pub fn kube_config(&self) -> kube::Config {
        kube::Config::new(self.url().parse().expect("url"))
    }

    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.kube_config()).expect("kube client")
    }

    /// Adds or replaces an object, keyed by (kind, namespace, name); the kind
    /// comes from `obj["kind"]`. A namespaced object without a namespace goes
    /// to "default". Bumps the global resourceVersion, sets
    /// `metadata.resourceVersion` (and `uid`/`creationTimestamp` when missing,
    /// kept from the previous version on replace), records ADDED or MODIFIED
    /// and returns the new resourceVersion.
    pub fn apply(&self, obj: Value) -> String {
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::parse)
            .unwrap_or_else(|| panic!("apply: unsupported or missing kind in {obj}"));
        self.apply_as(kind, obj)
    }

    /// Like [`apply`](Self::apply) for an object without `kind` (e.g. a list item).
    pub fn apply_as(&self, kind: Kind, mut obj: Value) -> String {
        let map = obj.as_object_mut().expect("apply: object expected");
        map.insert("kind".into(), json!(kind.name()));
        map.insert("apiVersion".into(), json!(kind.api_version()));
        let meta = map
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("apply: metadata must be an object");
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .expect("apply: metadata.name required")
            .to_string();
        let key = if kind.namespaced() {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            meta.insert("namespace".into(), json!(ns));
            format!("{ns}/{name}")
        } else {
            meta.remove("namespace");
            name
        };

        let mut st = self.inner.lock();
        st.rv += 1;
        let rv = st.rv;
        let prev = st.objects[kind.idx()].get(&key).cloned();
        let prev_meta = prev.as_ref().map(|p| &p["metadata"]);
        if meta.get("uid").is_none_or(Value::is_null) {
            let uid = match prev_meta.and_then(|m| m.get("uid")) {
                Some(uid) => uid.clone(),
                None => {
                    st.next_uid += 1;
                    json!(format!(
                        "{:08x}-0000-4000-8000-{:012x}",
                        self.inner.addr.port(),
                        st.next_uid
                    ))
                }
            };
            meta.insert("uid".into(), uid);
        }
        if meta.get("creationTimestamp").is_none_or(Value::is_null) {
            let ts = match prev_meta.and_then(|m| m.get("creationTimestamp")) {
                Some(ts) => ts.clone(),
                None => now_timestamp(),
            };
            meta.insert("creationTimestamp".into(), ts);
        }
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let obj = Arc::new(obj);
        st.objects[kind.idx()].insert(key.clone(), obj.clone());
        let typ = if prev.is_some() {
            EvType::Modified
        } else {
            EvType::Added
        };
        st.publish(LogEntry {
            rv,
            kind,
            key,
            typ,
            obj,
            prev,
        });
        rv.to_string()
    }

    /// Applies every item of a recorded list (`kind: ServiceList` etc.), in
    /// order; returns the last resourceVersion.
    pub fn apply_list(&self, list: &Value) -> String {
        let kind = list
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::parse)
            .expect("apply_list: unsupported list kind");
        let items = list["items"].as_array().expect("apply_list: items");
        let mut rv = self.resource_version();
        for item in items {
            rv = self.apply_as(kind, item.clone());
        }
        rv
    }

    /// Deletes an object; records DELETED carrying the object with a new
    /// resourceVersion. `namespace` is ignored for Nodes. Returns false when
    /// there was no such object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let kind = parse_kind(kind);
        let key = object_key(kind, namespace, name);
        let mut st = self.inner.lock();
        let Some(prev) = st.objects[kind.idx()].remove(&key) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        let mut last = (*prev).clone();
        set_resource_version(&mut last, rv);
        st.publish(LogEntry {
            rv,
            kind,
            key,
            typ: EvType::Deleted,
            obj: Arc::new(last),
            prev: Some(prev),
        });
        true
    }

    /// The stored object (with kind, apiVersion and its resourceVersion).
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let kind = parse_kind(kind);
        let st = self.inner.lock();
        st.objects[kind.idx()]
            .get(&object_key(kind, namespace, name))
            .map(|o| (**o).clone())
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> String {
        self.inner.lock().rv.to_string()
    }

    /// Forgets the event log, like an etcd compaction at the current revision:
    /// a watch from an older resourceVersion gets the 410 ERROR event, a list
    /// at an older exact resourceVersion or with an older continue token gets a
    /// 410 Status. Open watches are not affected.
    pub fn compact(&self) {
        let mut st = self.inner.lock();
        st.log.clear();
        st.compacted = st.rv;
    }

    /// Abruptly ends every open watch stream (the connection is closed
    /// mid-stream, without the terminating chunk).
    pub fn drop_watches(&self) {
        self.inner.lock().kill_watches();
    }

    /// Number of watch streams of that kind currently open.
    pub fn open_watches(&self, kind: &str) -> usize {
        let kind = parse_kind(kind);
        let st = self.inner.lock();
        st.watches
            .iter()
            .filter(|w| w.kind == kind && !w.tx.is_closed())
            .count()
    }

    /// Takes the server down (refusing new requests per [`Outage`], by default
    /// closing connections, and ending open watches) or brings it back up.
    pub fn set_available(&self, up: bool) {
        let mut st = self.inner.lock();
        if st.available == up {
            return;
        }
        st.available = up;
        if !up {
            st.kill_watches();
            if st.outage == Outage::CloseConnections {
                self.inner.kill_conns.send_modify(|e| *e += 1);
            }
        }
        drop(st);
        self.inner.changed.send_modify(|e| *e += 1);
    }

    /// How [`set_available(false)`](Self::set_available) refuses requests.
    pub fn set_outage(&self, mode: Outage) {
        self.inner.lock().outage = mode;
    }

    /// While held, LIST requests of that kind wait without an answer; they are
    /// answered (with the state at that moment) once released.
    pub fn hold_lists(&self, kind: &str, hold: bool) {
        let kind = parse_kind(kind);
        let mut st = self.inner.lock();
        if hold {
            st.held.insert(kind);
        } else {
            st.held.remove(&kind);
        }
        drop(st);
        self.inner.changed.send_modify(|e| *e += 1);
    }

    /// (LIST requests received, WATCH requests received) for a kind, counted
    /// when the request reaches the handler (a held list counts at once);
    /// requests refused because the server is down are not counted.
    pub fn requests(&self, kind: &str) -> (usize, usize) {
        let kind = parse_kind(kind);
        let st = self.inner.lock();
        (st.lists[kind.idx()], st.watch_count[kind.idx()])
    }

    /// The resourceVersion of the last periodic BOOKMARK queued on a watch of
    /// that kind.
    pub fn last_bookmark(&self, kind: &str) -> Option<String> {
        let kind = parse_kind(kind);
        self.inner.lock().last_bookmark[kind.idx()].map(|rv| rv.to_string())
    }

    /// Every request that reached the handler, as "GET /path?query"
    /// (including refused ones).
    pub fn request_log(&self) -> Vec<String> {
        self.inner.lock().request_log.clone()
    }

    /// A plain HTTP/1.1 GET (with `Connection: close`) read until the server
    /// closes the connection or `read_for` elapses, for checking raw response
    /// shapes.
    pub async fn raw_get(&self, path_and_query: &str, read_for: Duration) -> RawResponse {
        let addr = self.inner.addr;
        let target = path_and_query.to_string();
        tokio::task::spawn_blocking(move || raw_get_blocking(addr, &target, read_for))
            .await
            .expect("raw_get task")
    }
}

/// Decodes a continue token (base64url JSON, as kube-apiserver makes them:
/// `{"v":"meta.k8s.io/v1","rv":N,"start":"ns/name\u0000"}`).
pub fn continue_token_json(token: &str) -> Option<Value> {
    serde_json::from_slice(&b64_decode(token)?).ok()
}

/// Polls `cond` every 20ms until it holds or `timeout` elapses; returns
/// whether it held.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

struct Inner {
    state: Mutex<State>,
    /// Bumped when holds or availability change (wakes held lists).
    changed: watch::Sender<u64>,
    /// Bumped when the server goes down in `CloseConnections` mode.
    kill_conns: watch::Sender<u64>,
    opts: FakeOptions,
    addr: SocketAddr,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EvType {
    Added,
    Modified,
    Deleted,
}

struct LogEntry {
    rv: u64,
    kind: Kind,
    key: String,
    typ: EvType,
    /// The new object; for DELETED the last state with the deletion's RV.
    obj: Arc<Value>,
    /// The object before this change (`None` for a creation).
    prev: Option<Arc<Value>>,
}

enum WatchMsg {
    Line(String),
    Kill,
}

struct WatchReg {
    kind: Kind,
    filter: Arc<Filter>,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

struct State {
    rv: u64,
    /// Watches from, and exact lists at, an RV older than this get 410.
    compacted: u64,
    /// Per kind, keyed like etcd: "namespace/name" or "name".
    objects: [BTreeMap<String, Arc<Value>>; Kind::ALL.len()],
    /// Every change after `compacted`, in RV order.
    log: Vec<LogEntry>,
    watches: Vec<WatchReg>,
    available: bool,
    outage: Outage,
    held: HashSet<Kind>,
    lists: [usize; Kind::ALL.len()],
    watch_count: [usize; Kind::ALL.len()],
    last_bookmark: [Option<u64>; Kind::ALL.len()],
    request_log: Vec<String>,
    next_uid: u64,
}

impl State {
    fn new() -> State {
        State {
            rv: 1,
            compacted: 1,
            objects: Default::default(),
            log: Vec::new(),
            watches: Vec::new(),
            available: true,
            outage: Outage::CloseConnections,
            held: HashSet::new(),
            lists: [0; Kind::ALL.len()],
            watch_count: [0; Kind::ALL.len()],
            last_bookmark: [None; Kind::ALL.len()],
            request_log: Vec::new(),
            next_uid: 0,
        }
    }

    fn publish(&mut self, entry: LogEntry) {
        self.watches.retain(|w| !w.tx.is_closed());
        for w in &self.watches {
            if w.kind == entry.kind
                && let Some(line) = render_entry(&entry, &w.filter)
            {
                let _ = w.tx.send(WatchMsg::Line(line));
            }
        }
        self.log.push(entry);
    }

    fn kill_watches(&mut self) {
        for w in self.watches.drain(..) {
            let _ = w.tx.send(WatchMsg::Kill);
        }
    }

    /// The objects of a kind as they were at `at` (which must be >= compacted).
    fn snapshot(&self, kind: Kind, at: u64) -> BTreeMap<String, Arc<Value>> {
        let mut objects = self.objects[kind.idx()].clone();
        for e in self.log.iter().rev() {
            if e.rv <= at {
                break;
            }
            if e.kind != kind {
                continue;
            }
            match &e.prev {
                Some(p) => objects.insert(e.key.clone(), p.clone()),
                None => objects.remove(&e.key),
            };
        }
        objects
    }
}

fn parse_kind(kind: &str) -> Kind {
    Kind::parse(kind).unwrap_or_else(|| panic!("unsupported kind {kind:?}"))
}

fn object_key(kind: Kind, namespace: &str, name: &str) -> String {
    if kind.namespaced() {
        format!("{namespace}/{name}")
    } else {
        name.to_string()
    }
}

fn set_resource_version(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
    }
}

fn now_timestamp() -> Value {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).expect("timestamp")
}

fn event_line(typ: &str, obj: &Value) -> String {
    format!("{{\"type\":\"{typ}\",\"object\":{obj}}}\n")
}

fn bookmark_line(kind: Kind, rv: u64, initial_events_end: bool) -> String {
    let annotations = if initial_events_end {
        r#","annotations":{"k8s.io/initial-events-end":"true"}"#
    } else {
        ""
    };
    format!(
        "{{\"type\":\"BOOKMARK\",\"object\":{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{rv}\",\"creationTimestamp\":null{annotations}}}{}}}}}\n",
        kind.name(),
        kind.api_version(),
        kind.bookmark_tail(),
    )
}

/// The event a watch with `filter` sees for a change, as apiserver's cacher
/// does: objects entering the selection are ADDED, leaving it DELETED (the old
/// object with the new RV).
fn render_entry(e: &LogEntry, filter: &Filter) -> Option<String> {
    let new_matches = filter.matches(&e.obj);
    match e.typ {
        EvType::Added => new_matches.then(|| event_line("ADDED", &e.obj)),
        EvType::Deleted => new_matches.then(|| event_line("DELETED", &e.obj)),
        EvType::Modified => {
            let old_matches = e.prev.as_ref().is_some_and(|p| filter.matches(p));
            match (old_matches, new_matches) {
                (true, true) => Some(event_line("MODIFIED", &e.obj)),
                (false, true) => Some(event_line("ADDED", &e.obj)),
                (true, false) => {
                    let mut old = (**e.prev.as_ref()?).clone();
                    set_resource_version(&mut old, e.rv);
                    Some(event_line("DELETED", &old))
                }
                (false, false) => None,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Filter {
    namespace: Option<String>,
    /// (field, equal?, value)
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelReq>,
}

#[derive(Debug)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Filter {
    fn has_selectors(&self) -> bool {
        !self.fields.is_empty() || !self.labels.is_empty()
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        let field = |f: &str| -> String {
            match f {
                "metadata.name" => meta["name"].as_str().unwrap_or("").to_string(),
                "metadata.namespace" => meta["namespace"].as_str().unwrap_or("").to_string(),
                _ => String::new(),
            }
        };
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        if !self.fields.iter().all(|(f, eq, v)| (field(f) == *v) == *eq) {
            return false;
        }
        let label = |k: &str| meta["labels"].get(k).and_then(Value::as_str);
        self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        })
    }
}

fn parse_field_selector(s: &str) -> Result<Vec<(String, bool, String)>, String> {
    let mut out = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (key, eq, value) = if let Some((k, v)) = term.split_once("!=") {
            (k, false, v)
        } else if let Some((k, v)) = term.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, true, v)
        } else {
            return Err(format!(
                "invalid selector: '{s}'; can't understand '{term}'"
            ));
        };
        let key = key.trim();
        if !matches!(key, "metadata.name" | "metadata.namespace") {
            return Err(format!("field label not supported: {key}"));
        }
        out.push((key.to_string(), eq, value.trim().to_string()));
    }
    Ok(out)
}

fn valid_label_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let bad =
        |term: &str| format!("unable to parse requirement: invalid label selector term {term:?}");
    // Split on commas outside parentheses.
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    if depth != 0 {
        return Err(bad(s));
    }
    let set = |rest: &str, term: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| bad(term))?;
        Ok(inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect())
    };
    let mut out = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let req = if let Some(k) = term.strip_prefix('!') {
            LabelReq::NotExists(k.trim().to_string())
        } else if let Some((k, rest)) = term.split_once(" notin ") {
            LabelReq::NotIn(k.trim().to_string(), set(rest, term)?)
        } else if let Some((k, rest)) = term.split_once(" in ") {
            LabelReq::In(k.trim().to_string(), set(rest, term)?)
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelReq::NotEq(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = term.split_once("==") {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = term.split_once('=') {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else {
            LabelReq::Exists(term.to_string())
        };
        let key = match &req {
            LabelReq::Eq(k, _)
            | LabelReq::NotEq(k, _)
            | LabelReq::In(k, _)
            | LabelReq::NotIn(k, _)
            | LabelReq::Exists(k)
            | LabelReq::NotExists(k) => k,
        };
        if !valid_label_key(key) {
            return Err(bad(term));
        }
        out.push(req);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Continue tokens (base64url JSON, like apiserver's)
// ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct ContinueToken {
    v: String,
    rv: i64,
    start: String,
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

fn encode_continue(rv: i64, start: &str) -> String {
    let token = ContinueToken {
        v: "meta.k8s.io/v1".into(),
        rv,
        start: start.to_string(),
    };
    b64_encode(serde_json::to_string(&token).expect("token").as_bytes())
}

fn decode_continue(s: &str) -> Option<ContinueToken> {
    let token: ContinueToken = serde_json::from_slice(&b64_decode(s)?).ok()?;
    (token.v == "meta.k8s.io/v1").then_some(token)
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct StatusBody {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: Value,
    status: &'static str,
    message: String,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Value>,
    code: u16,
}

fn json_response(code: StatusCode, body: String) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from(body))
        .expect("response")
}

fn status_response(
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Option<Value>,
) -> Response {
    status_response_with_meta(code, reason, message, details, json!({}))
}

fn status_response_with_meta(
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Option<Value>,
    metadata: Value,
) -> Response {
    let body = StatusBody {
        kind: "Status",
        api_version: "v1",
        metadata,
        status: "Failure",
        message,
        reason,
        details,
        code: code.as_u16(),
    };
    json_response(code, serde_json::to_string(&body).expect("status"))
}

fn bad_request(message: String) -> Response {
    status_response(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

fn expired_status_line() -> String {
    let body = StatusBody {
        kind: "Status",
        api_version: "v1",
        metadata: json!({}),
        status: "Failure",
        message: "The resourceVersion for the provided watch is too old.".into(),
        reason: "Expired",
        details: None,
        code: 410,
    };
    event_line("ERROR", &serde_json::to_value(&body).expect("status"))
}

enum Route {
    Version,
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    Object {
        kind: Kind,
        namespace: String,
        name: String,
    },
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api", "v1", rest @ ..] => rest,
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => rest,
        ["apis", "networking.k8s.io", "v1", rest @ ..] => rest,
        _ => return None,
    };
    let group_ok = |k: Kind| (k.api_version() == "v1") == (segs[0] == "api");
    let kind_of = |plural: &str| {
        Kind::ALL
            .into_iter()
            .find(|k| k.plural() == plural && group_ok(*k))
    };
    match rest {
        [plural] => Some(Route::Collection {
            kind: kind_of(plural)?,
            namespace: None,
        }),
        [plural, name] => {
            let kind = kind_of(plural).filter(|k| !k.namespaced())?;
            Some(Route::Object {
                kind,
                namespace: String::new(),
                name: (*name).to_string(),
            })
        }
        ["namespaces", ns, plural] => Some(Route::Collection {
            kind: kind_of(plural).filter(|k| k.namespaced())?,
            namespace: Some((*ns).to_string()),
        }),
        ["namespaces", ns, plural, name] => Some(Route::Object {
            kind: kind_of(plural).filter(|k| k.namespaced())?,
            namespace: (*ns).to_string(),
            name: (*name).to_string(),
        }),
        _ => None,
    }
}

#[derive(Default)]
struct Params {
    watch: bool,
    resource_version: Option<String>,
    resource_version_match: Option<String>,
    allow_bookmarks: bool,
    send_initial_events: bool,
    timeout_seconds: Option<u64>,
    limit: Option<i64>,
    cont: Option<String>,
    field_selector: Option<String>,
    label_selector: Option<String>,
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid value for {name}: {v:?}")),
    }
}

fn parse_params(uri: &Uri) -> Result<Params, String> {
    let Query(pairs) =
        Query::<Vec<(String, String)>>::try_from_uri(uri).map_err(|e| e.to_string())?;
    let mut p = Params::default();
    for (k, v) in pairs {
        match k.as_str() {
            "watch" => p.watch = parse_bool(&k, &v)?,
            "resourceVersion" => p.resource_version = Some(v),
            "resourceVersionMatch" => p.resource_version_match = Some(v),
            "allowWatchBookmarks" => p.allow_bookmarks = parse_bool(&k, &v)?,
            "sendInitialEvents" => p.send_initial_events = parse_bool(&k, &v)?,
            "timeoutSeconds" => {
                p.timeout_seconds = Some(
                    v.parse()
                        .map_err(|_| format!("invalid timeoutSeconds {v:?}"))?,
                )
            }
            "limit" => p.limit = Some(v.parse().map_err(|_| format!("invalid limit {v:?}"))?),
            "continue" => p.cont = Some(v).filter(|v| !v.is_empty()),
            "fieldSelector" => p.field_selector = Some(v),
            "labelSelector" => p.label_selector = Some(v),
            _ => {}
        }
    }
    Ok(p)
}

async fn handle(AxState(inner): AxState<Arc<Inner>>, method: Method, uri: Uri) -> Response {
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string());
    {
        let mut st = inner.lock();
        st.request_log.push(format!("{method} {target}"));
        if !st.available {
            return unavailable();
        }
    }
    if method != Method::GET {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
            Some(json!({})),
        );
    }
    let not_found = || {
        status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
            Some(json!({})),
        )
    };
    let Some(route) = route(uri.path()) else {
        return not_found();
    };
    let params = match parse_params(&uri) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    match route {
        Route::Version => json_response(
            StatusCode::OK,
            json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
                "goVersion": "", "compiler": "gc", "platform": "linux/amd64"
            })
            .to_string(),
        ),
        Route::Object {
            kind,
            namespace,
            name,
        } => get_object(&inner, kind, &namespace, &name),
        Route::Collection { kind, namespace } => {
            let fields = match parse_field_selector(params.field_selector.as_deref().unwrap_or(""))
            {
                Ok(f) => f,
                Err(e) => return bad_request(e),
            };
            let labels = match parse_label_selector(params.label_selector.as_deref().unwrap_or(""))
            {
                Ok(l) => l,
                Err(e) => return bad_request(e),
            };
            let filter = Filter {
                namespace,
                fields,
                labels,
            };
            if params.watch {
                start_watch(&inner, kind, filter, &params)
            } else {
                list(&inner, kind, &filter, &params).await
            }
        }
    }
}

fn unavailable() -> Response {
    status_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        "the fake apiserver is unavailable".into(),
        None,
    )
}

fn get_object(inner: &Inner, kind: Kind, namespace: &str, name: &str) -> Response {
    let st = inner.lock();
    match st.objects[kind.idx()].get(&object_key(kind, namespace, name)) {
        Some(obj) => json_response(StatusCode::OK, obj.to_string()),
        None => {
            let resource = match kind.group() {
                Some(g) => format!("{}.{g}", kind.plural()),
                None => kind.plural().to_string(),
            };
            let mut details = json!({ "name": name });
            if let Some(g) = kind.group() {
                details["group"] = json!(g);
            }
            details["kind"] = json!(kind.plural());
            status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{resource} \"{name}\" not found"),
                Some(details),
            )
        }
    }
}

#[derive(Serialize)]
struct ListBody {
    kind: String,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: ListMeta,
    items: Vec<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: String,
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    cont: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining_item_count: Option<usize>,
}

async fn list(inner: &Inner, kind: Kind, filter: &Filter, p: &Params) -> Response {
    // Count, then wait while held.
    let mut changed = inner.changed.subscribe();
    inner.lock().lists[kind.idx()] += 1;
    loop {
        {
            let st = inner.lock();
            if !st.available {
                return unavailable();
            }
            if !st.held.contains(&kind) {
                break;
            }
        }
        if changed.changed().await.is_err() {
            break;
        }
    }

    let st = inner.lock();
    // Which snapshot, and from which key on.
    let (at, start) = if let Some(cont) = &p.cont {
        let Some(token) = decode_continue(cont) else {
            return bad_request(format!("continue key is not valid: {cont:?}"));
        };
        if token.rv >= 0 && (token.rv as u64) < st.compacted {
            return status_response_with_meta(
                StatusCode::GONE,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter, or use the continue token \
                 in this response to retrieve the remainder of the results. Continuing with the \
                 provided token results in an inconsistent list - objects that were created, \
                 modified, or deleted between the time the first chunk was returned and now may \
                 show up in the list."
                    .into(),
                None,
                json!({ "continue": encode_continue(-1, &token.start) }),
            );
        }
        let at = if token.rv < 0 { st.rv } else { token.rv as u64 };
        (at, token.start)
    } else {
        let rv = p.resource_version.as_deref().unwrap_or("");
        let exact = match p.resource_version_match.as_deref() {
            None | Some("") => p.limit.is_some_and(|l| l > 0) && !rv.is_empty() && rv != "0",
            Some("Exact") => true,
            Some("NotOlderThan") => false,
            Some(other) => {
                return bad_request(format!("unsupported resourceVersionMatch {other:?}"));
            }
        };
        let at = if rv.is_empty() || rv == "0" {
            if exact {
                return bad_request(
                    "resourceVersionMatch=Exact requires a non-zero resourceVersion".into(),
                );
            }
            st.rv
        } else {
            let Ok(n) = rv.parse::<u64>() else {
                return bad_request(format!("invalid resourceVersion {rv:?}"));
            };
            if n > st.rv {
                return status_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    format!("Too large resource version: {n}, current: {}", st.rv),
                    Some(
                        json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
                    ),
                );
            }
            if exact {
                if n < st.compacted {
                    return status_response(
                        StatusCode::GONE,
                        "Expired",
                        "The resourceVersion for the provided list is too old.".into(),
                        None,
                    );
                }
                n
            } else {
                st.rv
            }
        };
        (at, String::new())
    };

    let objects = st.snapshot(kind, at);
    drop(st);
    let matching: Vec<(&String, &Arc<Value>)> = objects
        .range(start..)
        .filter(|(_, o)| filter.matches(o))
        .collect();
    let limit = p.limit.filter(|l| *l > 0).map(|l| l as usize);
    let (page, cont, remaining) = match limit {
        Some(limit) if matching.len() > limit => {
            let page = &matching[..limit];
            let last_key = page[limit - 1].0;
            let cont = encode_continue(at as i64, &format!("{last_key}\u{0}"));
            let remaining = (!filter.has_selectors()).then(|| matching.len() - limit);
            (page, Some(cont), remaining)
        }
        _ => (&matching[..], None, None),
    };
    let items = page
        .iter()
        .map(|(_, o)| {
            let mut item = (***o).clone();
            if let Some(m) = item.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            item
        })
        .collect();
    let body = ListBody {
        kind: format!("{}List", kind.name()),
        api_version: kind.api_version(),
        metadata: ListMeta {
            resource_version: at.to_string(),
            cont,
            remaining_item_count: remaining,
        },
        items,
    };
    json_response(StatusCode::OK, serde_json::to_string(&body).expect("list"))
}

fn start_watch(inner: &Arc<Inner>, kind: Kind, filter: Filter, p: &Params) -> Response {
    if p.send_initial_events && !p.allow_bookmarks {
        return bad_request("sendInitialEvents requires allowWatchBookmarks=true".into());
    }
    let filter = Arc::new(filter);
    let mut pending = VecDeque::new();
    let mut st = inner.lock();
    st.watch_count[kind.idx()] += 1;
    let rv = p.resource_version.as_deref().unwrap_or("");
    let mut rx = None;
    if p.send_initial_events || rv.is_empty() || rv == "0" {
        // Synthetic ADDED events for the current state, then live events.
        for obj in st.objects[kind.idx()].values() {
            if filter.matches(obj) {
                pending.push_back(event_line("ADDED", obj));
            }
        }
        if p.send_initial_events {
            pending.push_back(bookmark_line(kind, st.rv, true));
        }
    } else {
        let Ok(from) = rv.parse::<u64>() else {
            return bad_request(format!("invalid resourceVersion {rv:?}"));
        };
        if from < st.compacted {
            pending.push_back(expired_status_line());
        } else {
            for e in st.log.iter().filter(|e| e.rv > from && e.kind == kind) {
                if let Some(line) = render_entry(e, &filter) {
                    pending.push_back(line);
                }
            }
        }
    }
    if !pending
        .front()
        .is_some_and(|l| l.starts_with("{\"type\":\"ERROR\""))
    {
        let (tx, r) = mpsc::unbounded_channel();
        st.watches.push(WatchReg { kind, filter, tx });
        rx = Some(r);
    }
    drop(st);

    let cap = inner.opts.max_watch_timeout;
    let timeout = match p.timeout_seconds {
        Some(s) if s > 0 => Duration::from_secs(s).min(cap),
        _ => cap,
    };
    let bookmarks = match inner.opts.bookmark_interval {
        Some(period) if p.allow_bookmarks && rx.is_some() => {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            Some(i)
        }
        _ => None,
    };
    let stream = WatchStream {
        inner: inner.clone(),
        kind,
        pending,
        rx,
        deadline: Box::pin(tokio::time::sleep(timeout)),
        bookmarks,
        killed: false,
        done: false,
    };
    let body = futures::stream::unfold(stream, WatchStream::next_chunk);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(body))
        .expect("response")
}

struct WatchStream {
    inner: Arc<Inner>,
    kind: Kind,
    pending: VecDeque<String>,
    /// `None` for a stream that only sends what is pending (the 410 ERROR).
    rx: Option<mpsc::UnboundedReceiver<WatchMsg>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    bookmarks: Option<tokio::time::Interval>,
    killed: bool,
    done: bool,
}

enum Wake {
    Msg(Option<WatchMsg>),
    Deadline,
    Bookmark,
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl WatchStream {
    async fn next_chunk(mut self) -> Option<(io::Result<String>, WatchStream)> {
        loop {
            if self.killed {
                // Yield once so hyper flushes what was already written, then
                // an error makes it close the connection without the final chunk.
                tokio::task::yield_now().await;
                self.killed = false;
                self.done = true;
                self.pending.clear();
                let err = io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "watch dropped by fake apiserver",
                );
                return Some((Err(err), self));
            }
            if let Some(line) = self.pending.pop_front() {
                return Some((Ok(line), self));
            }
            if self.done {
                return None;
            }
            let rx = self.rx.as_mut()?;
            let wake = tokio::select! {
                biased;
                msg = rx.recv() => Wake::Msg(msg),
                () = self.deadline.as_mut() => Wake::Deadline,
                () = tick(&mut self.bookmarks) => Wake::Bookmark,
            };
            match wake {
                Wake::Msg(Some(WatchMsg::Line(line))) => return Some((Ok(line), self)),
                Wake::Msg(Some(WatchMsg::Kill) | None) => self.killed = true,
                Wake::Deadline => self.done = true,
                Wake::Bookmark => self.bookmark(),
            }
        }
    }

    fn bookmark(&mut self) {
        let mut st = self.inner.lock();
        // Everything up to the current RV is already queued (events are sent
        // under the lock): deliver it before the bookmark.
        if let Some(rx) = self.rx.as_mut() {
            while let Ok(msg) = rx.try_recv() {
                match msg {
                    WatchMsg::Line(line) => self.pending.push_back(line),
                    WatchMsg::Kill => {
                        self.killed = true;
                        return;
                    }
                }
            }
        }
        let rv = st.rv;
        st.last_bookmark[self.kind.idx()] = Some(rv);
        self.pending.push_back(bookmark_line(self.kind, rv, false));
    }
}

// ---------------------------------------------------------------------------
// Listener whose connections can be cut when the server goes down
// ---------------------------------------------------------------------------

struct FakeListener {
    tcp: TcpListener,
    inner: Arc<Inner>,
}

impl axum::serve::Listener for FakeListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            let (io, addr) = match self.tcp.accept().await {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            {
                let st = self.inner.lock();
                if !st.available && st.outage == Outage::CloseConnections {
                    drop(io);
                    continue;
                }
            }
            let _ = io.set_nodelay(true);
            let mut kill = self.inner.kill_conns.subscribe();
            let killed = Box::pin(async move {
                if kill.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            });
            return (
                Conn {
                    io,
                    killed,
                    dead: false,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

struct Conn {
    io: TcpStream,
    killed: Pin<Box<dyn Future<Output = ()> + Send>>,
    dead: bool,
}

impl Conn {
    fn dead(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        self.dead
    }
}

fn conn_reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "fake apiserver went down")
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.dead(cx) {
            return Poll::Ready(Err(conn_reset()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.dead(cx) {
            return Poll::Ready(Err(conn_reset()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.dead(cx) {
            return Poll::Ready(Err(conn_reset()));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP client for shape checks
// ---------------------------------------------------------------------------

fn raw_get_blocking(addr: SocketAddr, target: &str, read_for: Duration) -> RawResponse {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to fake apiserver");
    // A server that is down closes the connection at once: that shows as a
    // closed connection without a status, not as a failure here.
    let mut closed = write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .is_err();
    let deadline = Instant::now() + read_for;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    while !closed
        && let Some(left) = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    {
        s.set_read_timeout(Some(left.min(Duration::from_millis(50))))
            .expect("set_read_timeout");
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, raw_body) = match split {
        Some(i) => (&buf[..i], &buf[i + 4..]),
        None => (&buf[..], &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut head_lines = head.split("\r\n");
    let status = head_lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = head_lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let (body, chunked_end) = if chunked {
        dechunk(raw_body)
    } else {
        (raw_body.to_vec(), false)
    };
    let body = String::from_utf8_lossy(&body).into_owned();
    RawResponse {
        status,
        headers,
        body,
        closed,
        chunked_end,
    }
}

/// Decodes a chunked body; also returns whether the final chunk arrived.
fn dechunk(mut s: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = s.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size_line = String::from_utf8_lossy(&s[..eol]);
        let Ok(size) = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (out, false);
        };
        let rest = &s[eol + 2..];
        if size == 0 {
            return (out, true);
        }
        if rest.len() < size {
            out.extend_from_slice(rest);
            return (out, false);
        }
        out.extend_from_slice(&rest[..size]);
        s = rest[size..].strip_prefix(b"\r\n").unwrap_or(&rest[size..]);
    }
}
