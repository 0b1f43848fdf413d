//! The model's view of one watched kind, kept in step event by event.
//!
//! The agent used to hold every Service and EndpointSlice twice: whole, as the apiserver sent
//! it (managedFields, annotations, status: most of the agent's memory at 10k Services), in a
//! kube-rs reflector store, and converted, in a cache beside it. Now each object is converted
//! the moment its event arrives and only the model is kept; the API object is dropped with the
//! event. An object whose conversion did not change keeps its old allocation, so snapshots
//! share it and the incremental compile sees it unchanged by pointer. A (re-)list after a watch
//! break or a `410 Gone` fills a buffer that replaces the view when the list completes: objects
//! deleted meanwhile go, and a half-done list is never seen.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::Resource;

pub use crate::convert::ConvertResult;
use crate::convert::Rejected;
use crate::model::{ObjectRef, Objects};

/// The converted objects of one kind, and those that could not be used, by namespace/name.
pub struct Mirror<T> {
    pub objects: Objects<T>,
    pub rejected: BTreeMap<ObjectRef, Rejected>,
    /// What was left out of objects that are used (a bad address, port or endpoint).
    pub skipped: BTreeMap<ObjectRef, Vec<Rejected>>,
    /// The list in progress, if any: it replaces the two maps above when it completes.
    listing: Option<Listing<T>>,
}

struct Listing<T> {
    objects: Objects<T>,
    rejected: BTreeMap<ObjectRef, Rejected>,
    skipped: BTreeMap<ObjectRef, Vec<Rejected>>,
}

impl<T> Listing<T> {
    fn new() -> Self {
        Listing {
            objects: Objects::new(),
            rejected: BTreeMap::new(),
            skipped: BTreeMap::new(),
        }
    }
}

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Mirror {
            objects: Objects::new(),
            rejected: BTreeMap::new(),
            skipped: BTreeMap::new(),
            listing: None,
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

impl<T: PartialEq> Mirror<T> {
    /// An added or modified object, converted. Returns whether the view changed (a status-only
    /// update, say, leaves the model as it was).
    pub fn apply(&mut self, key: ObjectRef, result: ConvertResult<T>) -> bool {
        match result {
            Ok(Some(usable)) => {
                let rejected = self.rejected.remove(&key).is_some();
                let skipped = if usable.skipped.is_empty() {
                    self.skipped.remove(&key)
                } else {
                    self.skipped.insert(key.clone(), usable.skipped.clone())
                };
                let same_skipped = skipped.unwrap_or_default() == usable.skipped;
                if !rejected
                    && same_skipped
                    && self.objects.get(&key).is_some_and(|o| **o == usable.object)
                {
                    return false;
                }
                self.objects.insert(key, Arc::new(usable.object));
                true
            }
            // Not for svcproxy (headless, ExternalName, another proxy's): nothing to keep.
            Ok(None) => self.delete(&key).0,
            Err(e) => {
                self.skipped.remove(&key);
                let removed = self.objects.remove(&key).is_some();
                let old = self.rejected.insert(key, e.clone());
                removed || old.as_ref() != Some(&e)
            }
        }
    }

    /// A deleted object: whether the view changed, and the model it had.
    pub fn delete(&mut self, key: &ObjectRef) -> (bool, Option<Arc<T>>) {
        let old = self.objects.remove(key);
        let rejected = self.rejected.remove(key).is_some();
        let skipped = self.skipped.remove(key).is_some();
        (old.is_some() || rejected || skipped, old)
    }

    /// A (re-)list begins: what it lists is buffered until [`Mirror::end_list`].
    pub fn begin_list(&mut self) {
        self.listing = Some(Listing::new());
    }

    /// One listed object, converted. Returns whether it differs from the current view.
    pub fn list_apply(&mut self, key: ObjectRef, result: ConvertResult<T>) -> bool {
        let listing = self.listing.get_or_insert_with(Listing::new);
        match result {
            Ok(Some(usable)) => {
                let old_skipped = self.skipped.get(&key).map_or(&[][..], Vec::as_slice);
                let same = match self.objects.get(&key) {
                    Some(old)
                        if **old == usable.object
                            && old_skipped == usable.skipped.as_slice()
                            && !self.rejected.contains_key(&key) =>
                    {
                        Some(old.clone())
                    }
                    _ => None,
                };
                let changed = same.is_none();
                if !usable.skipped.is_empty() {
                    listing.skipped.insert(key.clone(), usable.skipped);
                }
                listing
                    .objects
                    .insert(key, same.unwrap_or_else(|| Arc::new(usable.object)));
                changed
            }
            Ok(None) => self.objects.contains_key(&key) || self.rejected.contains_key(&key),
            Err(e) => {
                let changed =
                    self.objects.contains_key(&key) || self.rejected.get(&key) != Some(&e);
                listing.rejected.insert(key, e);
                changed
            }
        }
    }

    /// The list is complete: its objects become the view. Returns whether the view changed
    /// (objects gone while the watch was away, or listed in another state).
    pub fn end_list(&mut self) -> bool {
        let Some(listing) = self.listing.take() else {
            return false;
        };
        let changed = listing.objects.len() != self.objects.len()
            || listing.rejected != self.rejected
            || listing.skipped != self.skipped
            || listing
                .objects
                .iter()
                .zip(&self.objects)
                .any(|((k1, a), (k2, b))| k1 != k2 || !Arc::ptr_eq(a, b));
        self.objects = listing.objects;
        self.rejected = listing.rejected;
        self.skipped = listing.skipped;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert;
    use k8s_openapi::api::core::v1::Service;

    fn svc(name: &str, cluster_ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"},
            "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    fn key(name: &str) -> ObjectRef {
        ObjectRef::new("ns", name)
    }

    fn apply(m: &mut Mirror<crate::model::Service>, s: Service) -> bool {
        m.apply(key_of(&s), convert::service(&s))
    }

    #[test]
    fn events_change_only_what_they_touch() {
        let mut m = Mirror::default();
        m.begin_list();
        for s in [svc("a", "10.0.0.1"), svc("b", "10.0.0.2"), svc("c", "None")] {
            m.list_apply(key_of(&s), convert::service(&s));
        }
        // Nothing is seen before the list completes.
        assert!(m.objects.is_empty());
        assert!(m.end_list());
        // c is headless: not kept, not rejected.
        assert_eq!(m.objects.len(), 2);
        let a = m.objects[&key("a")].clone();

        // The same content again: no change, the same allocation.
        assert!(!apply(&mut m, svc("a", "10.0.0.1")));
        assert!(Arc::ptr_eq(&a, &m.objects[&key("a")]));
        // Invalid: rejected, once.
        assert!(apply(&mut m, svc("b", "bogus")));
        assert!(!apply(&mut m, svc("b", "bogus")));
        assert!(m.rejected.contains_key(&key("b")) && !m.objects.contains_key(&key("b")));
        // Fixed again.
        assert!(apply(&mut m, svc("b", "10.0.0.3")));
        assert!(m.rejected.is_empty());
        // Becoming headless removes it.
        assert!(apply(&mut m, svc("b", "None")));
        assert!(!m.objects.contains_key(&key("b")));
        let (changed, old) = m.delete(&key("a"));
        assert!(changed && old.is_some_and(|o| Arc::ptr_eq(&o, &a)));
        assert!(!m.delete(&key("a")).0);
    }

    #[test]
    fn a_relist_replaces_the_view_and_keeps_unchanged_objects_shared() {
        let mut m = Mirror::default();
        for s in [svc("a", "10.0.0.1"), svc("b", "10.0.0.2"), svc("x", "bad")] {
            apply(&mut m, s);
        }
        let a = m.objects[&key("a")].clone();
        // While the watch was away: b was deleted, d created, x fixed.
        m.begin_list();
        for s in [
            svc("a", "10.0.0.1"),
            svc("d", "10.0.0.4"),
            svc("x", "10.0.0.9"),
        ] {
            m.list_apply(key_of(&s), convert::service(&s));
        }
        // The old view stays until the list is complete.
        assert!(m.objects.contains_key(&key("b")));
        assert!(m.end_list());
        let names: Vec<&str> = m.objects.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["a", "d", "x"]);
        assert!(m.rejected.is_empty());
        assert!(Arc::ptr_eq(&a, &m.objects[&key("a")]));

        // A re-list that finds everything as it was changes nothing.
        m.begin_list();
        for s in [
            svc("a", "10.0.0.1"),
            svc("d", "10.0.0.4"),
            svc("x", "10.0.0.9"),
        ] {
            assert!(!m.list_apply(key_of(&s), convert::service(&s)));
        }
        assert!(!m.end_list());
    }
}
