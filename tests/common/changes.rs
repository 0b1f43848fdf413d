//! A sequence of one-Service changes to a synthetic cluster, each of which an incremental
//! backend must send as a partial sync that compiled only that Service: shared by the root
//! tests against the real kernel (incremental.rs) and those against the in-memory one
//! (fake_kernel.rs).

use std::sync::Arc;

use svcproxy::model::{EndpointSlice, ObjectRef, Service, Snapshot, TrafficPolicy};
use svcproxy::synthetic;

/// The one slice of synthetic Service `i`, to change in place.
pub fn slice_of(s: &mut Snapshot, i: usize) -> &mut EndpointSlice {
    let svc = synthetic::service(i).id;
    let id = s
        .slices
        .values()
        .find(|sl| sl.service == svc)
        .map(|sl| sl.id.clone())
        .unwrap();
    Arc::make_mut(s.slices.get_mut(&id).unwrap())
}

pub type Change = Box<dyn Fn(&mut Snapshot)>;

/// The changes, in order, on `synthetic::cluster(40, 3)`.
pub fn changes() -> Vec<(&'static str, Change)> {
    vec![
        (
            "an endpoint replaced",
            Box::new(|s| slice_of(s, 3).endpoints[1].address = "10.255.0.1".parse().unwrap()),
        ),
        (
            "a Service grows to 5 endpoints (new slot maps, a new picking chain)",
            Box::new(|s| {
                let sl = slice_of(s, 4);
                for k in 0..2u8 {
                    let mut ep = sl.endpoints[0].clone();
                    ep.address = format!("10.255.1.{k}").parse().unwrap();
                    sl.endpoints.push(ep);
                }
            }),
        ),
        (
            "it shrinks back to 3 (slot maps and the chain go)",
            Box::new(|s| slice_of(s, 4).endpoints.truncate(3)),
        ),
        (
            "a NodePort Service with Local policy and an endpoint on this node",
            Box::new(|s| {
                let mut svc: Service = synthetic::service(500);
                svc.ports[0].node_port = Some(30500);
                svc.external_policy = TrafficPolicy::Local;
                s.services.insert(svc.id.clone(), svc.into());
                let mut sl = synthetic::slice(500, 2);
                sl.endpoints[0].node_name = Some("node-0".into());
                s.slices.insert(sl.id.clone(), sl.into());
            }),
        ),
        (
            "an endpoint stops being ready",
            Box::new(|s| slice_of(s, 7).endpoints[0].ready = false),
        ),
        (
            "a Service loses every endpoint (rejected)",
            Box::new(|s| slice_of(s, 8).endpoints.clear()),
        ),
        (
            "a Service is deleted",
            Box::new(|s| {
                let id: ObjectRef = synthetic::service(9).id;
                synthetic::remove_service(s, &id);
            }),
        ),
        ("nothing changed", Box::new(|_| {})),
    ]
}
