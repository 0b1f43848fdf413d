//! What ships besides the binary: the Kubernetes manifests of `deploy/` (each document against its
//! Kubernetes type, the RBAC rules, the DaemonSet's settings), the kube-proxy configuration they
//! and `systemd/` carry (through `svcproxy config check` when it exists), and the systemd unit
//! (its directives, and `systemd-analyze verify`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const NAMESPACE: &str = "kube-system";
const IMAGE: &str = "ghcr.io/svcproxy/svcproxy:v0.1.0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// YAML 1.2 scalars, as svcproxy reads manifests: `no` stays a string.
fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options
}

/// The non-empty documents of a YAML file.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(&text, yaml_options())
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Where `doc` and `back` differ, as paths: what the typed object lost or changed.
fn differences(path: &str, doc: &Value, back: &Value, out: &mut Vec<String>) {
    match (doc, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => differences(&here, value, other, out),
                    None => out.push(format!("{here} (not a field of the type)")),
                }
            }
            for key in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{key} (added by the type)"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// The document as its Kubernetes type. k8s-openapi ignores fields it does not know, so a
/// misspelled or misplaced field would pass unseen: the typed object must serialize back to
/// exactly the document.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, origin: &str) -> T {
    let object: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{origin}: does not parse as its type: {e}"));
    let back = serde_json::to_value(&object).unwrap();
    let mut lost = Vec::new();
    differences("", doc, &back, &mut lost);
    assert!(
        lost.is_empty(),
        "{origin}: fields its type does not have (misspelled or misplaced?):\n  {}",
        lost.join("\n  ")
    );
    object
}

/// Everything in `deploy/*.yaml` but the kustomization, by type.
#[derive(Default)]
struct Deploy {
    files: BTreeSet<String>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

impl Deploy {
    fn load() -> Deploy {
        let mut deploy = Deploy::default();
        let dir = repo().join("deploy");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        paths.sort();
        for path in paths {
            let file = path.file_name().unwrap().to_str().unwrap().to_string();
            if file == "kustomization.yaml" {
                continue;
            }
            let docs = yaml_documents(&path);
            assert!(!docs.is_empty(), "deploy/{file}: no documents");
            for (i, doc) in docs.iter().enumerate() {
                let kind = doc["kind"].as_str().unwrap_or_default();
                let origin = format!("deploy/{file}, document {} ({kind})", i + 1);
                match kind {
                    "ServiceAccount" => deploy.service_accounts.push(typed(doc, &origin)),
                    "ClusterRole" => deploy.cluster_roles.push(typed(doc, &origin)),
                    "ClusterRoleBinding" => deploy.bindings.push(typed(doc, &origin)),
                    "ConfigMap" => deploy.config_maps.push(typed(doc, &origin)),
                    "DaemonSet" => deploy.daemon_sets.push(typed(doc, &origin)),
                    _ => panic!("{origin}: unexpected kind {kind:?}"),
                }
            }
            deploy.files.insert(file);
        }
        deploy
    }

    fn service_account(&self) -> &ServiceAccount {
        assert_eq!(self.service_accounts.len(), 1, "one ServiceAccount");
        &self.service_accounts[0]
    }

    fn cluster_role(&self) -> &ClusterRole {
        assert_eq!(self.cluster_roles.len(), 1, "one ClusterRole");
        &self.cluster_roles[0]
    }

    fn binding(&self) -> &ClusterRoleBinding {
        assert_eq!(self.bindings.len(), 1, "one ClusterRoleBinding");
        &self.bindings[0]
    }

    fn config_map(&self) -> &ConfigMap {
        assert_eq!(self.config_maps.len(), 1, "one ConfigMap");
        &self.config_maps[0]
    }

    fn daemon_set(&self) -> &DaemonSet {
        assert_eq!(self.daemon_sets.len(), 1, "one DaemonSet");
        &self.daemon_sets[0]
    }

    /// The KubeProxyConfiguration in the ConfigMap (`config.conf`).
    fn proxy_config_text(&self) -> &str {
        let data = self.config_map().data.as_ref().expect("ConfigMap data");
        data.get("config.conf")
            .expect("ConfigMap key config.conf, as kube-proxy's")
    }
}

#[test]
fn every_manifest_is_a_known_kubernetes_object_in_kube_system() {
    let deploy = Deploy::load();
    let sa = deploy.service_account();
    let role = deploy.cluster_role();
    let binding = deploy.binding();
    let cm = deploy.config_map();
    let ds = deploy.daemon_set();
    for (kind, meta) in [
        ("ServiceAccount", &sa.metadata),
        ("ConfigMap", &cm.metadata),
        ("DaemonSet", &ds.metadata),
    ] {
        assert_eq!(meta.namespace.as_deref(), Some(NAMESPACE), "{kind}");
    }
    for (kind, meta) in [
        ("ServiceAccount", &sa.metadata),
        ("ClusterRole", &role.metadata),
        ("ClusterRoleBinding", &binding.metadata),
        ("ConfigMap", &cm.metadata),
        ("DaemonSet", &ds.metadata),
    ] {
        assert_eq!(meta.name.as_deref(), Some("svcproxy"), "{kind} name");
        let app = meta.labels.as_ref().and_then(|l| l.get("k8s-app"));
        assert_eq!(app.map(String::as_str), Some("svcproxy"), "{kind} label");
    }
}

#[test]
fn kustomization_lists_exactly_the_manifests() {
    let deploy = Deploy::load();
    let path = repo().join("deploy/kustomization.yaml");
    let docs = yaml_documents(&path);
    assert_eq!(docs.len(), 1, "kustomization.yaml: one document");
    let k = &docs[0];
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    assert_eq!(k["namespace"], NAMESPACE);
    let listed: Vec<String> = k["resources"]
        .as_array()
        .expect("kustomization.yaml: resources")
        .iter()
        .map(|r| r.as_str().expect("a file name").to_string())
        .collect();
    let unique: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(unique.len(), listed.len(), "listed twice: {listed:?}");
    assert_eq!(
        unique, deploy.files,
        "kustomization.yaml resources vs deploy/*.yaml"
    );
}

#[test]
fn rbac_is_exactly_the_least_privilege() {
    let deploy = Deploy::load();
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in deploy.cluster_role().rules.as_deref().unwrap_or_default() {
        assert!(rule.resource_names.is_none(), "resourceNames: {rule:?}");
        assert!(
            rule.non_resource_urls.is_none(),
            "nonResourceURLs: {rule:?}"
        );
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                granted
                    .entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    assert!(
        deploy.cluster_role().aggregation_rule.is_none(),
        "no aggregation"
    );
    let granted: BTreeSet<(String, String, Vec<String>)> = granted
        .into_iter()
        .map(|((g, r), verbs)| (g, r, verbs.into_iter().collect()))
        .collect();
    let read = ["get", "list", "watch"];
    let write = ["create", "patch"];
    let expected: BTreeSet<(String, String, Vec<String>)> = [
        ("", "services", &read[..]),
        ("discovery.k8s.io", "endpointslices", &read[..]),
        ("networking.k8s.io", "servicecidrs", &read[..]),
        ("", "nodes", &read[..]),
        ("", "events", &write[..]),
        ("events.k8s.io", "events", &write[..]),
    ]
    .into_iter()
    .map(|(g, r, verbs)| {
        let mut verbs: Vec<String> = verbs.iter().map(|v| v.to_string()).collect();
        verbs.sort();
        (g.to_string(), r.to_string(), verbs)
    })
    .collect();
    assert_eq!(granted, expected);

    let binding = deploy.binding();
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        deploy.cluster_role().metadata.name.as_ref()
    );
    let sa = deploy.service_account();
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet pod spec")
}

fn container(ds: &DaemonSet) -> &Container {
    let containers = &pod_spec(ds).containers;
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The volume mounted at `mount_path`, and whether the mount is read-only.
fn mounted_at<'a>(ds: &'a DaemonSet, mount_path: &str) -> (&'a Volume, bool) {
    let mounts = container(ds).volume_mounts.as_deref().unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|m| m.mount_path == mount_path)
        .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
    let volume = pod_spec(ds)
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {:?}", mount.name));
    (volume, mount.read_only == Some(true))
}

/// The port of a `host:port` bind address.
fn port_of(bind: &str) -> i32 {
    bind.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{bind:?}: no port"))
}

#[test]
fn daemonset_has_the_required_settings() {
    let deploy = Deploy::load();
    let ds = deploy.daemon_set();
    let spec = ds.spec.as_ref().unwrap();
    let template_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref();
    assert_eq!(
        template_labels
            .and_then(|l| l.get("k8s-app"))
            .map(String::as_str),
        Some("svcproxy")
    );
    for (key, value) in spec.selector.match_labels.as_ref().expect("matchLabels") {
        assert_eq!(
            template_labels.and_then(|l| l.get(key)),
            Some(value),
            "the selector must match the pod template: {key}"
        );
    }
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::Int(1))
    );

    let pod = pod_spec(ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod.service_account_name.as_ref(),
        deploy.service_account().metadata.name.as_ref()
    );
    let tolerates_all = pod
        .tolerations
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|t| {
            t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()
                && t.value.is_none()
        });
    assert!(
        tolerates_all,
        "a toleration {{operator: Exists}} for every taint"
    );

    let c = container(ds);
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    let command = c.command.as_deref().unwrap_or_default();
    assert_eq!(
        command,
        [
            "/usr/local/bin/svcproxy",
            "run",
            "--config=/var/lib/svcproxy/config.conf",
            "--hostname-override=$(NODE_NAME)",
        ]
    );
    assert!(c.args.is_none(), "everything is in the command");
    let node_name = c
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("env NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from the downward API");
    assert_eq!(field.field_path, "spec.nodeName");

    let security = c.security_context.as_ref().expect("securityContext");
    let caps = security.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<&str> = caps
        .add
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(added, BTreeSet::from(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.run_as_user, Some(0));

    let resources = c.resources.as_ref().expect("resources");
    let quantities = |m: Option<&BTreeMap<String, Quantity>>| -> BTreeMap<String, String> {
        m.into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect()
    };
    assert_eq!(
        quantities(resources.requests.as_ref()),
        BTreeMap::from([
            ("cpu".to_string(), "50m".to_string()),
            ("memory".to_string(), "128Mi".to_string())
        ])
    );
    assert_eq!(
        quantities(resources.limits.as_ref()),
        BTreeMap::from([("memory".to_string(), "512Mi".to_string())])
    );

    // The probes ask the port the configuration binds healthz to.
    let config: Value =
        serde_saphyr::from_str_with_options(deploy.proxy_config_text(), yaml_options())
            .expect("config.conf is YAML");
    let healthz_port = port_of(
        config["healthzBindAddress"]
            .as_str()
            .expect("healthzBindAddress"),
    );
    assert_eq!(healthz_port, 10256);
    for (name, probe, path) in [
        ("livenessProbe", c.liveness_probe.as_ref(), "/livez"),
        ("readinessProbe", c.readiness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{name}: httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "{name}");
        assert_eq!(get.port, IntOrString::Int(healthz_port), "{name}");
        assert!(
            matches!(get.scheme.as_deref(), None | Some("HTTP")),
            "{name}: plain HTTP"
        );
    }
    let liveness = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(liveness.host.as_deref(), Some("127.0.0.1"));

    // The ConfigMap is mounted where --config points, under the key it names.
    let config_path = command[2].strip_prefix("--config=").unwrap();
    let (dir, file) = config_path.rsplit_once('/').unwrap();
    let (volume, read_only) = mounted_at(ds, dir);
    let source = volume
        .config_map
        .as_ref()
        .expect("the config volume is a ConfigMap");
    assert_eq!(
        Some(&source.name),
        deploy.config_map().metadata.name.as_ref()
    );
    assert!(read_only, "the configuration is mounted read-only");
    assert!(source.items.is_none(), "every key, under its own name");
    assert!(
        deploy
            .config_map()
            .data
            .as_ref()
            .unwrap()
            .contains_key(file),
        "the ConfigMap has no key {file:?}"
    );

    let (volume, read_only) = mounted_at(ds, "/run/xtables.lock");
    let host = volume.host_path.as_ref().expect("xtables lock: hostPath");
    assert_eq!(host.path, "/run/xtables.lock");
    assert_eq!(host.type_.as_deref(), Some("FileOrCreate"));
    assert!(!read_only, "the xtables lock is taken, so written");

    let (volume, read_only) = mounted_at(ds, "/lib/modules");
    let host = volume.host_path.as_ref().expect("modules: hostPath");
    assert_eq!(host.path, "/lib/modules");
    assert!(read_only, "/lib/modules is mounted read-only");

    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    for volume in pod.volumes.as_deref().unwrap_or_default() {
        assert!(
            mounts.iter().any(|m| m.name == volume.name),
            "volume {:?} is never mounted",
            volume.name
        );
    }
}

/// The settings the issue asks of every shipped KubeProxyConfiguration; `kubeconfig` differs.
fn check_proxy_config(text: &str, kubeconfig: &str, origin: &str) {
    let config: Value = serde_saphyr::from_str_with_options(text, yaml_options())
        .unwrap_or_else(|e| panic!("{origin}: not YAML: {e}"));
    let expected = json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clusterCIDR": "10.244.0.0/16",
        "bindAddress": "0.0.0.0",
        "healthzBindAddress": "0.0.0.0:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": [],
        "detectLocalMode": "ClusterCIDR",
        "nftables": {
            "masqueradeAll": false,
            "masqueradeBit": 14,
            "syncPeriod": "1h0m0s",
            "minSyncPeriod": "1s",
        },
        "conntrack": {
            "maxPerCore": 32768,
            "min": 131072,
            "tcpEstablishedTimeout": "24h0m0s",
            "tcpCloseWaitTimeout": "1h0m0s",
        },
        "clientConnection": { "kubeconfig": kubeconfig },
        "featureGates": {},
    });
    for (key, want) in expected.as_object().unwrap() {
        assert_eq!(&config[key], want, "{origin}: {key}");
    }
}

/// `svcproxy config check FILE` accepts the file.
fn config_check(path: &Path, origin: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_svcproxy"))
        .args(["config", "check"])
        .arg(path)
        .env_remove("NODE_NAME")
        .env_remove("KUBECONFIG")
        .output()
        .expect("svcproxy config check");
    assert!(
        out.status.success(),
        "svcproxy config check {origin}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn configmap_holds_a_valid_kube_proxy_configuration() {
    let deploy = Deploy::load();
    let text = deploy.proxy_config_text();
    check_proxy_config(text, "", "deploy/configmap.yaml config.conf");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.conf");
    std::fs::write(&path, text).unwrap();
    config_check(&path, "deploy/configmap.yaml config.conf");
}

#[test]
fn systemd_config_is_a_valid_kube_proxy_configuration() {
    let path = repo().join("systemd/config.yaml");
    check_proxy_config(
        &read(&path),
        "/etc/svcproxy/kubeconfig",
        "systemd/config.yaml",
    );
    config_check(&path, "systemd/config.yaml");
}

#[test]
fn daemonset_and_systemd_configurations_differ_only_in_credentials() {
    let deploy = Deploy::load();
    let parse = |text: &str| -> Value {
        let mut config: Value = serde_saphyr::from_str_with_options(text, yaml_options()).unwrap();
        config["clientConnection"]["kubeconfig"] = Value::Null;
        config
    };
    assert_eq!(
        parse(deploy.proxy_config_text()),
        parse(&read(&repo().join("systemd/config.yaml"))),
        "deploy/configmap.yaml config.conf vs systemd/config.yaml"
    );
}

/// A unit file as `(section, key, value)` in order; `#` and `;` start comments, a trailing `\`
/// continues the line.
fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut entries = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(start) = line.strip_suffix('\\') {
            pending.push_str(start);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a directive: {line:?}"));
        assert!(!section.is_empty(), "{key} outside a section");
        entries.push((
            section.clone(),
            key.trim().to_string(),
            value.trim().to_string(),
        ));
    }
    entries
}

struct Unit(Vec<(String, String, String)>);

impl Unit {
    fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The only value of a directive.
    fn one(&self, section: &str, key: &str) -> &str {
        let values = self.values(section, key);
        assert_eq!(values.len(), 1, "[{section}] {key}= once: {values:?}");
        values[0]
    }

    /// A list directive's words (an empty assignment resets the list, as in systemd).
    fn words(&self, section: &str, key: &str) -> BTreeSet<&str> {
        let mut words = BTreeSet::new();
        for value in self.values(section, key) {
            if value.is_empty() {
                words.clear();
            }
            words.extend(value.split_whitespace());
        }
        words
    }
}

fn unit_path() -> PathBuf {
    repo().join("systemd/svcproxy.service")
}

#[test]
fn systemd_unit_has_the_required_directives() {
    let unit = Unit(parse_unit(&read(&unit_path())));
    let sections: BTreeSet<&str> = unit.0.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(sections, BTreeSet::from(["Unit", "Service", "Install"]));

    assert!(!unit.one("Unit", "Description").is_empty());
    assert!(!unit.one("Unit", "Documentation").is_empty());
    assert!(
        unit.words("Unit", "Wants")
            .contains("network-online.target")
    );
    assert!(
        unit.words("Unit", "After")
            .contains("network-online.target")
    );

    let exact = [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("EnvironmentFile", "-/etc/default/svcproxy"),
        ("Restart", "always"),
        ("RestartSec", "2"),
        ("User", "root"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectKernelModules", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("LimitNOFILE", "65536"),
    ];
    for (key, want) in exact {
        assert_eq!(unit.one("Service", key), want, "[Service] {key}");
    }
    let exec: Vec<&str> = unit
        .one("Service", "ExecStart")
        .split_whitespace()
        .collect();
    assert_eq!(
        exec,
        [
            "/usr/local/bin/svcproxy",
            "run",
            "--config",
            "/etc/svcproxy/config.yaml",
            "$SVCPROXY_ARGS"
        ]
    );
    let caps = BTreeSet::from(["CAP_NET_ADMIN", "CAP_NET_RAW"]);
    assert_eq!(unit.words("Service", "AmbientCapabilities"), caps);
    assert_eq!(unit.words("Service", "CapabilityBoundingSet"), caps);
    assert_eq!(
        unit.words("Service", "RestrictAddressFamilies"),
        BTreeSet::from(["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"])
    );
    assert!(unit.words("Service", "ReadWritePaths").contains("/run"));
    // Conntrack sysctls must stay writable; no watchdog pings are sent.
    assert!(
        unit.values("Service", "ProtectKernelTunables").is_empty(),
        "ProtectKernelTunables= would make the conntrack sysctls read-only"
    );
    assert!(
        unit.values("Service", "WatchdogSec").is_empty(),
        "svcproxy sends no WATCHDOG=1"
    );

    assert!(
        unit.words("Install", "WantedBy")
            .contains("multi-user.target")
    );
}

#[test]
fn systemd_env_file_sets_what_the_unit_uses() {
    let text = read(&repo().join("systemd/svcproxy.env"));
    let set: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(set, ["SVCPROXY_ARGS="], "only SVCPROXY_ARGS is set (empty)");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("#NODE_NAME=")),
        "NODE_NAME is shown, commented out"
    );
}

/// `systemd-analyze verify` on the unit, its ExecStart pointed at `binary`: success, and every
/// line it printed about the unit.
fn systemd_analyze_verify(analyze_dir: &Path, unit_text: &str, binary: &str) -> (bool, String) {
    let unit = unit_text.replace("/usr/local/bin/svcproxy", binary);
    let path = analyze_dir.join("svcproxy.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze verify");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It exits 0 on warnings (an unknown directive, say), naming the unit: those count too.
    // Warnings about other units (the targets it pulls in) are the system's business.
    let about_ours: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("svcproxy.service"))
        .collect();
    (
        out.status.success() && about_ours.is_empty(),
        format!("{}\n{output}", out.status),
    )
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let installed = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze not installed (CI is set): install the systemd package"
        );
        println!("SKIPPED: systemd-analyze not installed");
        return;
    }
    let binary = env!("CARGO_BIN_EXE_svcproxy");
    assert!(
        !binary.contains(char::is_whitespace),
        "the test binary's path has spaces: {binary}"
    );
    let text = read(&unit_path());
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = systemd_analyze_verify(dir.path(), &text, binary);
    assert!(ok, "systemd-analyze verify svcproxy.service:\n{output}");

    // And the check can fail: an unknown directive is reported.
    let broken = text.replace("[Service]\n", "[Service]\nNoSuchDirective=yes\n");
    assert_ne!(broken, text);
    let (ok, output) = systemd_analyze_verify(dir.path(), &broken, binary);
    assert!(!ok, "an unknown directive went unnoticed:\n{output}");
}
