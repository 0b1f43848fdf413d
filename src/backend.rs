//! The two backends behind one interface, for the agent and the `apply` command.
//!
//! [`Backend::sync`] takes a snapshot and does everything: compile, apply, work out the stale UDP
//! flows, keep the snapshot and plan for the caller. The agent's backends
//! ([`Backend::for_agent`]) compile only the Services that changed (`nft::incremental`,
//! `iptables::incremental`, both on the backend-neutral `incremental`) and write only what
//! changed. For tests and the one-shot `apply` command, [`Backend::desired`] and [`Backend::apply`] also take
//! an already compiled plan (a test can hand in a broken ruleset).
//!
//! The first apply of a process also removes the other backend's leftovers (a node switched
//! from one mode to the other), so that only one set of svcproxy rules decides.

use std::time::Instant;

use crate::conntrack::{Conntrack, ConntrackError, stale_udp};
use crate::iptables::{self, Iptables, IptablesError, Variant};
use crate::model::{ProxyConfig, Snapshot};
use crate::nft::apply::{ApplyError, NftCommand, Nftables};
use crate::nft::incremental::Incremental;
use crate::plan::Plan;
use crate::report::{ApplyReport, Outcome};

/// Which backend programs the kernel, and how to run it.
pub struct Backend {
    kind: Kind,
    /// Words that run a program where the rules go (`ip netns exec NS`), empty for here.
    prefix: Vec<String>,
    /// Whether the other backend's leftovers were looked for (once per process).
    leftovers_done: bool,
    /// What [`Backend::sync`] compiles with.
    config: ProxyConfig,
    /// The last snapshot synced and its plan (the incremental backend keeps its own).
    last: Option<(Snapshot, Plan)>,
}

enum Kind {
    Nftables(Nftables),
    Incremental(Box<Incremental>),
    Iptables(Iptables),
    IptablesIncremental(Box<iptables::incremental::Incremental>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name())
            .finish()
    }
}

/// An apply that failed, from either backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Nftables(#[from] ApplyError),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
}

impl BackendError {
    /// Why, as a label value: `spawn` (the program could not be run), `refused` (it refused
    /// the transaction; the kernel kept its rules), `command_failed` (one iptables command
    /// failed), `not_installed` (no iptables variant).
    pub fn metric_label(&self) -> &'static str {
        match self {
            BackendError::Nftables(e) => e.metric_label(),
            BackendError::Iptables(e) => e.metric_label(),
        }
    }
}

/// What one backend applies: rendered on the caller's thread, applied on a blocking one.
#[derive(Debug)]
pub enum Desired {
    Nftables(crate::nft::Ruleset),
    Iptables(iptables::Ruleset),
}

impl Backend {
    /// The nftables backend, or (with an iptables command) the iptables one.
    pub fn new(nft: NftCommand, iptables: Option<iptables::IptablesCommand>) -> Backend {
        Self::with(nft, iptables, ProxyConfig::default(), false)
    }

    /// The agent's backend: for nftables, the incremental one. `config` is what
    /// [`Backend::sync`] compiles with.
    pub fn for_agent(
        nft: NftCommand,
        iptables: Option<iptables::IptablesCommand>,
        config: ProxyConfig,
    ) -> Backend {
        Self::with(nft, iptables, config, true)
    }

    fn with(
        nft: NftCommand,
        iptables: Option<iptables::IptablesCommand>,
        config: ProxyConfig,
        incremental: bool,
    ) -> Backend {
        let (prefix, kind) = match iptables {
            None => (
                // `nft`'s own words minus the program: the namespace wrapper, if any.
                nft.program[..nft.program.len().saturating_sub(1)].to_vec(),
                if incremental {
                    Kind::Incremental(Box::new(Incremental::new(nft, config.clone())))
                } else {
                    Kind::Nftables(Nftables::new(nft))
                },
            ),
            Some(cmd) => (
                cmd.prefix.clone(),
                if incremental {
                    Kind::IptablesIncremental(Box::new(iptables::incremental::Incremental::new(
                        cmd,
                        config.clone(),
                    )))
                } else {
                    Kind::Iptables(Iptables::new(cmd))
                },
            ),
        };
        Backend {
            kind,
            prefix,
            leftovers_done: false,
            config,
            last: None,
        }
    }

    /// Makes the kernel hold the rules of `snapshot`.
    pub fn sync(&mut self, snapshot: Snapshot) -> Result<Outcome, BackendError> {
        if matches!(
            self.kind,
            Kind::Incremental(_) | Kind::IptablesIncremental(_)
        ) && !self.leftovers_done
        {
            self.remove_other_backends_rules();
            self.leftovers_done = true;
        }
        match &mut self.kind {
            Kind::Incremental(inc) => return Ok(inc.sync(snapshot)?),
            Kind::IptablesIncremental(inc) => return Ok(inc.sync(snapshot)?),
            Kind::Nftables(_) | Kind::Iptables(_) => {}
        }
        let start = Instant::now();
        let plan = crate::plan::plan(&snapshot, &self.config);
        let desired = match &self.kind {
            Kind::Iptables(_) => Desired::Iptables(iptables::render(&plan)),
            _ => Desired::Nftables(crate::nft::render(&plan)),
        };
        let compile = start.elapsed();
        let report = self.apply(desired)?;
        let stale_udp = match &self.last {
            Some((_, old)) => stale_udp(old, &plan),
            None => Vec::new(),
        };
        let services = snapshot.services.len();
        self.last = Some((snapshot, plan));
        Ok(Outcome {
            report,
            compile,
            services_compiled: services,
            stale_udp,
            fallback: None,
        })
    }

    /// The last snapshot synced.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        match &self.kind {
            Kind::Incremental(i) => i.snapshot(),
            Kind::IptablesIncremental(i) => i.snapshot(),
            _ => self.last.as_ref().map(|(s, _)| s),
        }
    }

    /// The plan of the last snapshot synced.
    pub fn plan(&self) -> Option<&Plan> {
        match &self.kind {
            Kind::Incremental(i) => i.plan(),
            Kind::IptablesIncremental(i) => i.plan(),
            _ => self.last.as_ref().map(|(_, p)| p),
        }
    }

    /// Where this backend's conntrack entries are: the namespace its programs run in.
    pub fn conntrack(&self) -> Result<Conntrack, ConntrackError> {
        Conntrack::for_command_prefix(&self.prefix)
    }

    /// What the kernel holds of svcproxy's tables, compared with the plan last synced
    /// (`svcproxy_ruleset_drift`): `None` before the first sync.
    pub fn verify(
        &self,
    ) -> Option<Result<Vec<crate::verify::Difference>, crate::verify::VerifyError>> {
        let plan = self.plan()?;
        Some(match &self.kind {
            Kind::Iptables(i) => crate::verify::verify_iptables(i.command(), plan),
            Kind::IptablesIncremental(i) => crate::verify::verify_iptables(i.command(), plan),
            Kind::Nftables(_) | Kind::Incremental(_) => {
                let mut program = self.prefix.clone();
                program.push("nft".into());
                crate::verify::verify_nft(&NftCommand { program }, plan)
            }
        })
    }

    /// `nftables`, `iptables-legacy` or `iptables-nft`, for logs.
    pub fn name(&self) -> String {
        match &self.kind {
            Kind::Nftables(_) | Kind::Incremental(_) => "nftables".into(),
            Kind::Iptables(i) => format!("iptables-{}", i.command().variant),
            Kind::IptablesIncremental(i) => format!("iptables-{}", i.command().variant),
        }
    }

    /// This backend's form of the plan; `ruleset` is the compiler's nftables rendering.
    pub fn desired(&self, plan: &Plan, ruleset: crate::nft::Ruleset) -> Desired {
        match &self.kind {
            Kind::Nftables(_) | Kind::Incremental(_) => Desired::Nftables(ruleset),
            Kind::Iptables(_) | Kind::IptablesIncremental(_) => {
                Desired::Iptables(iptables::render(plan))
            }
        }
    }

    /// Applies (partially when possible). The first apply of a process also removes the other
    /// backend's rules. Not for the agent's incremental backend, which takes snapshots
    /// ([`Backend::sync`]).
    pub fn apply(&mut self, desired: Desired) -> Result<ApplyReport, BackendError> {
        if !self.leftovers_done {
            self.remove_other_backends_rules();
            self.leftovers_done = true;
        }
        match (&mut self.kind, desired) {
            (Kind::Nftables(n), Desired::Nftables(r)) => Ok(n.apply(r)?),
            (Kind::Iptables(i), Desired::Iptables(r)) => Ok(i.apply(r)?),
            (Kind::Incremental(_) | Kind::IptablesIncremental(_), _) => {
                panic!("the incremental backends sync snapshots")
            }
            _ => panic!("apply() given what desired() of another backend made"),
        }
    }

    /// Replaces everything (the `apply` command).
    pub fn apply_full(&mut self, desired: Desired) -> Result<ApplyReport, BackendError> {
        self.invalidate();
        self.apply(desired)
    }

    /// Forgets what was applied: the next apply is full.
    pub fn invalidate(&mut self) {
        match &mut self.kind {
            Kind::Nftables(n) => n.invalidate(),
            Kind::Incremental(n) => n.invalidate(),
            Kind::Iptables(i) => i.invalidate(),
            Kind::IptablesIncremental(i) => i.invalidate(),
        }
    }

    fn remove_other_backends_rules(&self) {
        match &self.kind {
            Kind::Nftables(_) | Kind::Incremental(_) => {
                remove_iptables_leftovers(&self.prefix, &Variant::ALL)
            }
            Kind::Iptables(_) | Kind::IptablesIncremental(_) => {
                let variant = match &self.kind {
                    Kind::Iptables(i) => i.command().variant,
                    Kind::IptablesIncremental(i) => i.command().variant,
                    _ => return,
                };
                // A node switched from one iptables variant to the other: packets go through
                // both, so the old variant's rules would still catch traffic.
                let other: Vec<Variant> =
                    Variant::ALL.into_iter().filter(|v| *v != variant).collect();
                remove_iptables_leftovers(&self.prefix, &other);
                let mut program = self.prefix.clone();
                program.push("nft".into());
                let tables = [("ip", crate::nft::TABLE), ("ip6", crate::nft::TABLE)];
                match crate::nft::apply::cleanup(&NftCommand { program }, &tables) {
                    Ok(()) => tracing::debug!("svcproxy's nftables tables are gone"),
                    // No nft on an iptables node is normal.
                    Err(e) => tracing::debug!("removing svcproxy's nftables tables: {e}"),
                }
            }
        }
    }
}

fn remove_iptables_leftovers(prefix: &[String], variants: &[Variant]) {
    match iptables::apply::cleanup(prefix, variants) {
        Ok(c) if c.chains + c.jumps > 0 => tracing::info!(
            chains = c.chains,
            jumps = c.jumps,
            "removed svcproxy's iptables rules left from an earlier mode: {}",
            c.places.join(", ")
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("removing svcproxy's iptables leftovers: {e}"),
    }
}
