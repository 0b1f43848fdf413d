//! What a sync did, whichever backend did it: the types the agent, `apply` and the benches read.
//! Neither backend owns them, so that neither imports the other.

use std::time::Duration;

use crate::conntrack::{StaleFlows, stale_udp};
use crate::incremental::{Compiled, Fallback, PlanDelta};
use crate::model::Snapshot;

/// Whether a sync rewrote svcproxy's tables or sent a difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    Full,
    Partial,
}

impl SyncKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Partial => "partial",
        }
    }
}

/// What one apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub kind: SyncKind,
    /// Commands sent (0: nothing had changed, the kernel was not asked).
    pub commands: usize,
    /// Elements (nftables) or rules (iptables) written.
    pub elements_added: usize,
    pub elements_deleted: usize,
    /// Chains created, rewritten or deleted.
    pub chains_changed: usize,
    /// Bytes of script (nft) or restore input (iptables) sent.
    pub script_bytes: usize,
    pub duration: Duration,
    /// Why a full sync was needed (`None` for partial syncs).
    pub full_because: Option<String>,
}

/// The result of one sync of a snapshot.
#[derive(Debug)]
pub struct Outcome {
    /// What was sent to the kernel; its `duration` is the kernel program's alone.
    pub report: ApplyReport,
    /// Planning, rendering and working out the difference, before the kernel program ran.
    pub compile: Duration,
    /// How many Services were compiled: all of them, only the changed ones, or none (a resync
    /// of the snapshot applied last reuses its plan).
    pub services_compiled: usize,
    /// UDP flows made stale by this sync (see `conntrack`).
    pub stale_udp: Vec<StaleFlows>,
    /// Set when the kernel held the last ruleset but the change could not be compiled Service
    /// by Service, so every Service was: why (the agent counts these by reason).
    pub fallback: Option<Fallback>,
}

/// The tail both incremental backends share, once the kernel took a partial sync's
/// transaction: works out the UDP flows it made stale, patches the kept plan with `delta` and
/// the backend's kept rendering with `rendering`, and keeps `snapshot` (the old one is dropped
/// here, after the kernel has the new rules). `Err`: the kept state cannot follow what the
/// kernel took; the caller compiles every Service from the snapshot handed back.
pub fn follow_partial(
    kept: &mut Compiled,
    delta: PlanDelta,
    snapshot: Snapshot,
    rendering: impl FnOnce() -> Result<(), Fallback>,
    report: ApplyReport,
    compile: Duration,
) -> Result<Outcome, Box<(Fallback, Snapshot)>> {
    let (old, new) = delta.stale_plans(&kept.plan);
    let stale_udp = stale_udp(&old, &new);
    let services = delta.services;
    match delta.apply(kept).and_then(|()| rendering()) {
        Ok(()) => {
            kept.snapshot = snapshot;
            Ok(Outcome {
                report,
                compile,
                services_compiled: services,
                stale_udp,
                fallback: None,
            })
        }
        Err(f) => Err(Box::new((f, snapshot))),
    }
}
