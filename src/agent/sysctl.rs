//! Setting the conntrack sysctls the configuration asks for (`conntrack.*` in
//! KubeProxyConfiguration): the one write the agent makes outside the rules. Which sysctls and
//! which values is `config`'s pure part ([`crate::config::Sysctl`]); this writes them.

use std::path::Path;

use crate::config::Sysctl;

/// Applies the conntrack sysctls (in this network namespace; `nf_conntrack_max` is global and
/// writable only from the host's). A failure is reported, not fatal: kube-proxy does the same.
pub fn apply(sysctls: &[Sysctl]) -> Vec<String> {
    let mut problems = Vec::new();
    for s in sysctls {
        let path = Path::new("/proc/sys").join(s.name);
        let current = std::fs::read_to_string(&path)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if current == Some(s.value) {
            continue;
        }
        match std::fs::write(&path, s.value.to_string()) {
            Ok(()) => tracing::info!(sysctl = s.name, value = s.value, "set"),
            Err(e) => problems.push(format!("{}: setting {}: {e}", path.display(), s.value)),
        }
    }
    problems
}
