//! The model's view of one reflector store, kept in step object by object.
//!
//! Reading a whole store and converting every object at every sync cost 65 ms at 10k Services
//! (and, before conversions were cached, 97 ms), most of it allocations, for a change that is
//! usually one EndpointSlice. The watchers note which objects an event touched
//! ([`Touched`](super::watch::Touched)); a [`Mirror`] converts just those again, and the
//! snapshot for the compiler is a copy of its map of shared (`Arc`) objects. A re-list (after a
//! watch break or a `410 Gone`) rebuilds it whole, so objects deleted meanwhile go.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube::Resource;
use kube::runtime::reflector::{self, Store};

pub use crate::convert::ConvertResult;
use crate::convert::Rejected;
use crate::model::ObjectRef;

/// The converted objects of one kind, and those that could not be used, by namespace/name.
pub struct Mirror<T> {
    pub objects: BTreeMap<ObjectRef, Arc<T>>,
    pub rejected: BTreeMap<ObjectRef, Rejected>,
    /// What was left out of objects that are used (a bad address, port or endpoint).
    pub skipped: BTreeMap<ObjectRef, Vec<Rejected>>,
}

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Mirror {
            objects: BTreeMap::new(),
            rejected: BTreeMap::new(),
            skipped: BTreeMap::new(),
        }
    }
}

/// The namespace/name of an API object.
pub fn key_of<K: Resource>(object: &K) -> ObjectRef {
    let meta = object.meta();
    ObjectRef::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl<T> Mirror<T> {
    /// Converts everything in `store` afresh.
    pub fn rebuild<K>(&mut self, store: &Store<K>, convert: impl Fn(&K) -> ConvertResult<T>)
    where
        K: Resource + Clone + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone,
    {
        self.objects.clear();
        self.rejected.clear();
        self.skipped.clear();
        for object in store.state() {
            self.set(key_of(&*object), convert(&object));
        }
    }

    /// Converts again the objects named in `keys`, as `store` has them now (gone: removed).
    pub fn update<K>(
        &mut self,
        store: &Store<K>,
        keys: &BTreeSet<ObjectRef>,
        convert: impl Fn(&K) -> ConvertResult<T>,
    ) where
        K: Resource + Clone + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone + Default,
    {
        for key in keys {
            let at = reflector::ObjectRef::<K>::new(&key.name).within(&key.namespace);
            match store.get(&at) {
                Some(object) => self.set(key.clone(), convert(&object)),
                None => {
                    self.objects.remove(key);
                    self.rejected.remove(key);
                    self.skipped.remove(key);
                }
            }
        }
    }

    fn set(&mut self, key: ObjectRef, result: ConvertResult<T>) {
        self.objects.remove(&key);
        self.rejected.remove(&key);
        self.skipped.remove(&key);
        match result {
            Ok(Some(usable)) => {
                if !usable.skipped.is_empty() {
                    self.skipped.insert(key.clone(), usable.skipped);
                }
                self.objects.insert(key, Arc::new(usable.object));
            }
            // Not for svcproxy (headless, ExternalName, another proxy's): nothing to keep.
            Ok(None) => {}
            Err(e) => {
                self.rejected.insert(key, e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert;
    use k8s_openapi::api::core::v1::Service;
    use kube::runtime::watcher::Event;

    fn svc(name: &str, cluster_ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"},
            "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    #[test]
    fn only_touched_objects_are_converted_again() {
        let (store, mut writer) = reflector::store::<Service>();
        writer.apply_watcher_event(&Event::Init);
        for s in [svc("a", "10.0.0.1"), svc("b", "10.0.0.2"), svc("c", "None")] {
            writer.apply_watcher_event(&Event::InitApply(s));
        }
        writer.apply_watcher_event(&Event::InitDone);
        let mut m = Mirror::default();
        m.rebuild(&store, convert::service);
        // c is headless: not kept, not rejected.
        assert_eq!(m.objects.len(), 2);
        let a = m.objects[&ObjectRef::new("ns", "a")].clone();

        writer.apply_watcher_event(&Event::Apply(svc("b", "bogus")));
        writer.apply_watcher_event(&Event::Delete(svc("a", "10.0.0.1")));
        writer.apply_watcher_event(&Event::Apply(svc("d", "10.0.0.4")));
        let touched: BTreeSet<ObjectRef> = ["a", "b", "d"]
            .into_iter()
            .map(|n| ObjectRef::new("ns", n))
            .collect();
        m.update(&store, &touched, convert::service);
        let names: Vec<&str> = m.objects.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["d"]);
        assert!(m.rejected.contains_key(&ObjectRef::new("ns", "b")));

        // Untouched objects keep their conversion (the same allocation).
        writer.apply_watcher_event(&Event::Apply(svc("a", "10.0.0.1")));
        m.update(
            &store,
            &[ObjectRef::new("ns", "a")].into_iter().collect(),
            convert::service,
        );
        let d = m.objects[&ObjectRef::new("ns", "d")].clone();
        m.update(
            &store,
            &[ObjectRef::new("ns", "a")].into_iter().collect(),
            convert::service,
        );
        assert!(Arc::ptr_eq(&d, &m.objects[&ObjectRef::new("ns", "d")]));
        assert_eq!(*a, *m.objects[&ObjectRef::new("ns", "a")]);
    }
}
