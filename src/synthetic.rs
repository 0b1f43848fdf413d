//! Generated clusters of any size, for benchmarks and scale tests: `services` ClusterIP Services
//! with one TCP port each and `endpoints` ready endpoints each, spread over 100 nodes (node-0 to
//! node-99; the proxy runs on node-0, so about 1% of the endpoints are local, as on a real node).
//!
//! Addresses are laid out so that nothing collides up to 65,536 Services and 16M endpoints:
//! Service i has ClusterIP 10.96.(i/256).(i%256)... in 10.96.0.0/12, endpoints in 10.128.0.0/9.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::model::{
    Endpoint, EndpointPort, EndpointSlice, IpFamily, NodeInfo, ObjectRef, Objects, Protocol,
    Service, ServicePort, Snapshot, TrafficPolicy,
};

/// How many nodes the endpoints are spread over.
pub const NODES: usize = 100;

/// The ClusterIP of generated Service `i`.
pub fn cluster_ip(i: usize) -> IpAddr {
    let n = 0x0a60_0000u32 + i as u32; // 10.96.0.0 + i
    IpAddr::V4(Ipv4Addr::from(n))
}

/// The address of endpoint `j` of generated Service `i`.
pub fn endpoint_ip(i: usize, j: usize, per_service: usize) -> IpAddr {
    let n = 0x0a80_0000u32 + (i * per_service + j) as u32; // 10.128.0.0 + k
    IpAddr::V4(Ipv4Addr::from(n))
}

/// One generated Service.
pub fn service(i: usize) -> Service {
    Service {
        id: ObjectRef::new(format!("ns{}", i % 100), format!("svc-{i}")),
        cluster_ips: vec![cluster_ip(i)],
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        }],
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        affinity_timeout: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
    }
}

/// `node-n`, one shared copy per node (as the watch's conversion shares them).
fn node_name(n: usize) -> Arc<str> {
    static NAMES: std::sync::OnceLock<Vec<Arc<str>>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| (0..NODES).map(|n| format!("node-{n}").into()).collect())[n].clone()
}

/// The EndpointSlice of generated Service `i`, with `endpoints` ready endpoints.
pub fn slice(i: usize, endpoints: usize) -> EndpointSlice {
    let svc = service(i).id;
    EndpointSlice {
        id: ObjectRef::new(svc.namespace.clone(), format!("{}-abcde", svc.name)),
        service: svc,
        family: IpFamily::V4,
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: (0..endpoints)
            .map(|j| Endpoint {
                address: endpoint_ip(i, j, endpoints),
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some(node_name((i + j * 7) % NODES)),
                zone: None,
                hints: None,
            })
            .collect(),
    }
}

/// A cluster of `services` Services with `endpoints` endpoints each, seen from node-0.
pub fn cluster(services: usize, endpoints: usize) -> Snapshot {
    let mut s = Snapshot {
        node: NodeInfo {
            name: "node-0".into(),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, 2))],
            ..NodeInfo::default()
        },
        ..Snapshot::default()
    };
    for i in 0..services {
        let svc = service(i);
        s.services.insert(svc.id.clone(), Arc::new(svc));
        let sl = slice(i, endpoints);
        s.slices.insert(sl.id.clone(), Arc::new(sl));
    }
    s
}

/// The `n`th object of `map` in key order, to change in place: what tests and benches edit a
/// synthetic cluster with (the persistent maps lend no iterator of mutable values).
pub fn nth_mut<T>(map: &mut Objects<T>, n: usize) -> &mut Arc<T> {
    let key = map
        .keys()
        .nth(n)
        .expect("the map has that many objects")
        .clone();
    map.get_mut(&key).expect("the key was just read")
}

/// `snapshot` without the Service `id` and its EndpointSlices.
pub fn remove_service(snapshot: &mut Snapshot, id: &ObjectRef) {
    snapshot.services.remove(id);
    snapshot.slices = snapshot
        .slices
        .iter()
        .filter(|(_, s)| s.service != *id)
        .map(|(k, s)| (k.clone(), s.clone()))
        .collect();
}
