//! svcproxy: a node-level Kubernetes Service proxy that programs nftables (or iptables).
//!
//! The flow goes one way: a source (manifest files, or the apiserver) is converted
//! ([`convert`]) into the [`model`] of the cluster as this node sees it; [`plan`] resolves the
//! Service semantics into a backend-independent plan; a backend ([`nft`], or [`iptables`] where nftables cannot be used) renders it. Everything
//! up to the rendered ruleset is pure: the dry-run and the live agent give identical rulesets for
//! the same state.

pub mod agent;
pub mod backend;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod convert;
pub mod duration;
pub mod fake_kernel;
pub mod incremental;
pub mod iptables;
pub mod manifests;
pub mod model;
pub mod nft;
pub mod plan;
pub mod process;
pub mod report;
pub mod services;
pub mod synthetic;
pub mod trace;
pub mod verify;

/// Compiles a snapshot into the nftables ruleset svcproxy would apply, with the plan it came
/// from (for diagnostics such as destination conflicts).
pub fn compile(
    snapshot: &model::Snapshot,
    config: &model::ProxyConfig,
) -> (plan::Plan, nft::Ruleset) {
    let plan = plan::plan(snapshot, config);
    let ruleset = nft::render(&plan);
    (plan, ruleset)
}
