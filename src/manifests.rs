//! Reading Kubernetes manifests from files: YAML (several documents per file) or JSON, single
//! objects or `List` kinds, from files or directories.
//!
//! Every problem costs only the document or object it is in and is reported with the file, the
//! document and the field. Kinds the proxy does not read are noted, not counted as problems: a
//! directory of manifests holds Deployments and ConfigMaps too.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::convert::{Converted, Rejected};

/// A problem that made the proxy leave something out.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {doc} (line {line}): {source}")]
    Parse {
        path: PathBuf,
        doc: usize,
        line: usize,
        #[source]
        source: DocumentError,
    },
    #[error("{path}: {rejected}")]
    Rejected { path: PathBuf, rejected: Rejected },
    #[error(
        "{kind} {object} is defined more than once with different content ({first} and {second}); using the one from {kept}"
    )]
    Conflict {
        kind: &'static str,
        object: String,
        first: PathBuf,
        second: PathBuf,
        kept: PathBuf,
    },
}

/// Why one document of a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Yaml(#[from] serde_saphyr::Error),
    #[error("not a Kubernetes object (expected a mapping)")]
    NotAnObject,
    #[error("no `kind`")]
    NoKind,
    #[error("{kind}: `items` is not a list")]
    ItemsNotAList { kind: String },
    #[error("{kind} item {index}: {source}")]
    Item {
        kind: String,
        index: usize,
        #[source]
        source: Box<DocumentError>,
    },
}

/// A typed API object that did not deserialize: the field (a serde path, empty for the
/// object itself) and why.
struct FieldError {
    field: String,
    reason: String,
}

/// What a set of manifest files held.
#[derive(Debug, Default)]
pub struct Loaded {
    pub converted: Converted,
    /// Things left out because they were wrong.
    pub errors: Vec<ManifestError>,
    /// Things left out by design (other kinds, other API versions).
    pub notices: Vec<String>,
}

impl Loaded {
    /// Whether anything usable was read at all.
    pub fn is_empty(&self) -> bool {
        self.converted.services.is_empty()
            && self.converted.slices.is_empty()
            && self.converted.nodes.is_empty()
    }
}

/// Raw objects by identity, before conversion, so that duplicates are resolved by content and not
/// by the order in which files were named.
#[derive(Default)]
struct Raw {
    services: BTreeMap<(String, String), (Value, PathBuf)>,
    slices: BTreeMap<(String, String), (Value, PathBuf)>,
    nodes: BTreeMap<(String, String), (Value, PathBuf)>,
    service_cidrs: BTreeMap<(String, String), (Value, PathBuf)>,
}

/// Reads every manifest under `paths` (files, or directories walked recursively for `.yaml`,
/// `.yml` and `.json` files).
pub fn load(paths: &[PathBuf]) -> Loaded {
    let mut loaded = Loaded::default();
    let mut files = Vec::new();
    for path in paths {
        collect_files(path, &mut files, &mut loaded.errors);
    }
    files.sort();
    files.dedup();
    let mut raw = Raw::default();
    for file in &files {
        match fs::read_to_string(file) {
            Ok(text) => read_text(file, &text, &mut raw, &mut loaded),
            Err(source) => loaded.errors.push(ManifestError::Io {
                path: file.clone(),
                source,
            }),
        }
    }
    convert_all(raw, &mut loaded);
    loaded
}

/// Reads manifests from one text (a file's content); `path` names it in messages.
pub fn load_text(path: &Path, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    let mut raw = Raw::default();
    read_text(path, text, &mut raw, &mut loaded);
    convert_all(raw, &mut loaded);
    loaded
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>, errors: &mut Vec<ManifestError>) {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(source) => {
            errors.push(ManifestError::Io {
                path: path.to_path_buf(),
                source,
            });
            return;
        }
    };
    if !meta.is_dir() {
        out.push(path.to_path_buf());
        return;
    }
    let entries = match fs::read_dir(path) {
        Ok(e) => e,
        Err(source) => {
            errors.push(ManifestError::Io {
                path: path.to_path_buf(),
                source,
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let p = entry.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            collect_files(&p, out, errors);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
}

/// Splits a YAML stream into its documents, each with the line it starts on, so that one broken
/// document does not take the others with it.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if marker || line == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2; // the document starts on the line after the marker
            if let Some(rest) = line.strip_prefix("---").filter(|r| !r.trim().is_empty()) {
                current.push_str(rest.trim_start());
                current.push('\n');
            }
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs.retain(|(_, d)| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

/// YAML 1.2 scalars: documents are read untyped first, so `n` or `no` must stay strings (a
/// Service named `n`), not become YAML 1.1 booleans.
fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.with_snippet = false; // one-line messages: the file and line are given already
    options
}

fn read_text(path: &Path, text: &str, raw: &mut Raw, loaded: &mut Loaded) {
    let is_json = path.extension().and_then(|e| e.to_str()) == Some("json")
        || text.trim_start().starts_with('{');
    let docs: Vec<(usize, Result<Value, DocumentError>)> = if is_json {
        vec![(1, serde_json::from_str(text).map_err(DocumentError::from))]
    } else {
        split_documents(text)
            .into_iter()
            .map(|(line, doc)| {
                (
                    line,
                    serde_saphyr::from_str_with_options::<Value>(&doc, yaml_options())
                        .map_err(DocumentError::from),
                )
            })
            .collect()
    };
    for (n, (line, doc)) in docs.into_iter().enumerate() {
        let doc_no = n + 1;
        let parse_error = |source: DocumentError| ManifestError::Parse {
            path: path.to_path_buf(),
            doc: doc_no,
            line,
            source,
        };
        match doc {
            Ok(Value::Null) => {}
            Ok(value) => {
                let errors = read_object(path, value, None, raw, loaded);
                loaded.errors.extend(errors.into_iter().map(parse_error));
            }
            Err(e) => loaded.errors.push(parse_error(e)),
        }
    }
}

/// Files one object (or the items of a List) under its kind. `implied_kind` is the item kind of
/// a typed list, whose items the API server sends without `kind`. Returns what was wrong (empty:
/// nothing); a List's bad items are each an error of their own, and the other items are read.
fn read_object(
    path: &Path,
    mut value: Value,
    implied_kind: Option<(&str, &str)>,
    raw: &mut Raw,
    loaded: &mut Loaded,
) -> Vec<DocumentError> {
    let Value::Object(map) = &mut value else {
        return vec![DocumentError::NotAnObject];
    };
    if let Some((api_version, kind)) = implied_kind {
        map.entry("apiVersion")
            .or_insert_with(|| Value::String(api_version.into()));
        map.entry("kind")
            .or_insert_with(|| Value::String(kind.into()));
    }
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let api_version = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let meta = map.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
        .to_string();
    if kind.is_empty() {
        return vec![DocumentError::NoKind];
    }
    if kind.ends_with("List") {
        let item_kind = match kind.as_str() {
            "ServiceList" => Some(("v1", "Service")),
            "EndpointSliceList" => Some(("discovery.k8s.io/v1", "EndpointSlice")),
            "NodeList" => Some(("v1", "Node")),
            "ServiceCIDRList" => Some(("networking.k8s.io/v1", "ServiceCIDR")),
            _ => None,
        };
        let items = match map.remove("items") {
            Some(Value::Array(items)) => items,
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return vec![DocumentError::ItemsNotAList { kind }],
        };
        let mut errors = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            let item_errors = read_object(path, item, item_kind, raw, loaded);
            errors.extend(item_errors.into_iter().map(|e| DocumentError::Item {
                kind: kind.clone(),
                index,
                source: Box::new(e),
            }));
        }
        return errors;
    }
    let table = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => &mut raw.services,
        ("discovery.k8s.io/v1", "EndpointSlice") => &mut raw.slices,
        ("v1", "Node") => &mut raw.nodes,
        ("networking.k8s.io/v1", "ServiceCIDR") => &mut raw.service_cidrs,
        _ => {
            let what = if namespace.is_empty() || kind == "Namespace" {
                name.clone()
            } else {
                format!("{namespace}/{name}")
            };
            loaded.notices.push(format!(
                "{}: skipping {api_version} {kind} {what}: svcproxy reads only v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node and networking.k8s.io/v1 ServiceCIDR",
                path.display()
            ));
            return Vec::new();
        }
    };
    let namespace = if kind == "Node" || kind == "ServiceCIDR" {
        String::new()
    } else {
        namespace
    };
    let key = (namespace, name);
    match table.get(&key) {
        Some((existing, _)) if *existing == value => {}
        Some((existing, first)) => {
            // Keep one of the two by content alone, so that the choice does not depend on
            // the order in which files were named.
            let keep_new = value.to_string().cmp(&existing.to_string()).is_gt();
            let second = path.to_path_buf();
            let kept = if keep_new {
                second.clone()
            } else {
                first.clone()
            };
            let kind_name: &'static str = match kind.as_str() {
                "Service" => "Service",
                "EndpointSlice" => "EndpointSlice",
                "ServiceCIDR" => "ServiceCIDR",
                _ => "Node",
            };
            loaded.errors.push(ManifestError::Conflict {
                kind: kind_name,
                object: if key.0.is_empty() {
                    key.1.clone()
                } else {
                    format!("{}/{}", key.0, key.1)
                },
                first: first.clone(),
                second,
                kept,
            });
            if keep_new {
                table.insert(key, (value, path.to_path_buf()));
            }
        }
        None => {
            table.insert(key, (value, path.to_path_buf()));
        }
    }
    Vec::new()
}

/// Deserializes into a typed API object, naming the field that did not fit.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        FieldError {
            field: if path == "." { String::new() } else { path },
            reason: e.into_inner().to_string(),
        }
    })
}

fn convert_all(raw: Raw, loaded: &mut Loaded) {
    let typed_error =
        |path: PathBuf, kind, object: String, e: FieldError| ManifestError::Rejected {
            path,
            rejected: Rejected {
                kind,
                object,
                field: e.field,
                reason: e.reason,
            },
        };
    use crate::convert::ObjectKind;
    for ((ns, name), (value, path)) in raw.services {
        match typed::<core::Service>(value) {
            Ok(svc) => {
                for rejected in loaded.converted.add_service(&svc) {
                    loaded.errors.push(ManifestError::Rejected {
                        path: path.clone(),
                        rejected,
                    });
                }
            }
            Err(m) => loaded.errors.push(typed_error(
                path,
                ObjectKind::Service,
                format!("{ns}/{name}"),
                m,
            )),
        }
    }
    for ((ns, name), (value, path)) in raw.slices {
        match typed::<discovery::EndpointSlice>(value) {
            Ok(slice) => {
                for rejected in loaded.converted.add_slice(&slice) {
                    loaded.errors.push(ManifestError::Rejected {
                        path: path.clone(),
                        rejected,
                    });
                }
            }
            Err(m) => loaded.errors.push(typed_error(
                path,
                ObjectKind::EndpointSlice,
                format!("{ns}/{name}"),
                m,
            )),
        }
    }
    for ((_, name), (value, path)) in raw.service_cidrs {
        match typed::<k8s_openapi::api::networking::v1::ServiceCIDR>(value) {
            Ok(obj) => {
                for rejected in loaded.converted.add_service_cidr(&obj) {
                    loaded.errors.push(ManifestError::Rejected {
                        path: path.clone(),
                        rejected,
                    });
                }
            }
            Err(m) => loaded
                .errors
                .push(typed_error(path, ObjectKind::ServiceCidr, name, m)),
        }
    }
    for ((_, name), (value, path)) in raw.nodes {
        match typed::<core::Node>(value) {
            Ok(node) => {
                for rejected in loaded.converted.add_node(&node) {
                    loaded.errors.push(ManifestError::Rejected {
                        path: path.clone(),
                        rejected,
                    });
                }
            }
            Err(m) => loaded
                .errors
                .push(typed_error(path, ObjectKind::Node, name, m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_documents_lists_and_other_kinds() {
        let text = r#"
# a comment before the first document
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: b}
  spec: {clusterIP: 10.0.0.2, ports: [{port: 80}]}
---
kind: EndpointSliceList
apiVersion: discovery.k8s.io/v1
items:
- metadata: {name: b-1, labels: {kubernetes.io/service-name: b}}
  addressType: IPv4
  endpoints: [{addresses: [10.1.0.1]}]
"#;
        let l = load_text(Path::new("t.yaml"), text);
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert_eq!(l.converted.services.len(), 2);
        assert_eq!(l.converted.slices.len(), 1);
        assert_eq!(l.notices.len(), 1);
        assert!(
            l.notices[0].contains("Deployment default/d"),
            "{}",
            l.notices[0]
        );
    }

    #[test]
    fn a_broken_document_costs_only_itself() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n---\nkind: [unclosed\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.0.0.2, ports: [{port: eighty}]}\n";
        let l = load_text(Path::new("t.yaml"), text);
        assert_eq!(l.converted.services.len(), 1);
        assert_eq!(l.errors.len(), 2, "{:?}", l.errors);
        let msgs: Vec<String> = l.errors.iter().map(|e| e.to_string()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("t.yaml: document 2 (line 6)")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("Service default/b: spec.ports[0].port")),
            "{msgs:?}"
        );
    }

    #[test]
    fn document_errors_say_which_item_and_why() {
        // The bad item 1 costs only itself: item 2 is read.
        let text = "kind: ServiceList\napiVersion: v1\nitems:\n- metadata: {name: a}\n  spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n- 7\n- metadata: {name: b}\n  spec: {clusterIP: 10.0.0.2, ports: [{port: 80}]}\n---\nmetadata: {name: x}\n---\nkind: NodeList\nitems: 3\n";
        let l = load_text(Path::new("t.yaml"), text);
        let found: Vec<String> = l
            .errors
            .iter()
            .map(|e| match e {
                ManifestError::Parse { source, .. } => match source {
                    DocumentError::Item { index, source, .. } => {
                        assert!(matches!(**source, DocumentError::NotAnObject));
                        format!("item {index}")
                    }
                    DocumentError::NoKind => "no kind".into(),
                    DocumentError::ItemsNotAList { kind } => format!("{kind} items"),
                    other => panic!("{other}"),
                },
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(
            found,
            ["item 1", "no kind", "NodeList items"],
            "{:?}",
            l.errors
        );
        assert_eq!(l.converted.services.len(), 2);
        assert_eq!(
            l.errors[0].to_string(),
            "t.yaml: document 1 (line 1): ServiceList item 1: not a Kubernetes object (expected a mapping)"
        );
    }

    #[test]
    fn json_file() {
        let text = r#"{"apiVersion":"v1","kind":"ServiceList","items":[{"metadata":{"name":"a"},"spec":{"clusterIP":"10.0.0.1","ports":[{"port":80}]}}]}"#;
        let l = load_text(Path::new("t.json"), text);
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert_eq!(l.converted.services.len(), 1);
    }
}
