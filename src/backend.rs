//! The seam between svcproxy and the kernel: the agent, `apply` and `cleanup` know only this
//! module and the backend-neutral report types, never which backend is behind it.
//!
//! A [`Mode`] says which backend and where its programs run (this namespace, another one, an
//! in-memory kernel: a [`Runner`]). Two kinds of backend are made from it:
//! - [`Live`], the agent's: takes snapshots, compiles only the Services that changed
//!   (`nft::incremental`, `iptables::incremental`, both on the backend-neutral `incremental`)
//!   and writes only what changed. Each backend is an [`Engine`]; `Live` holds one.
//! - [`OneShot`], the `apply` command's and the dataplane tests': applies a compiled plan. A
//!   test may edit the backend's own rendering first ([`OneShot::apply_edited`]), to hand the
//!   kernel a broken ruleset; the rendering comes from the backend, so a test cannot hand one
//!   backend the other's.
//!
//! The first apply of a process also removes the other backend's leftovers (a node switched
//! from one mode to the other), so that only one set of svcproxy rules decides.

use crate::conntrack::Conntrack;
use crate::iptables::{self, Iptables, IptablesCommand, IptablesError, Variant};
use crate::model::{ProxyConfig, Snapshot};
use crate::nft::apply::{ApplyError, NftCommand, Nftables};
use crate::plan::Plan;
use crate::process::Runner;
use crate::report::{ApplyReport, Outcome};
use crate::verify::{Difference, VerifyError};

/// Which backend programs the kernel, and where its programs run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Nftables(NftCommand),
    Iptables(IptablesCommand),
}

impl Mode {
    /// nftables, with its programs where `runner` runs them.
    pub fn nftables(runner: Runner) -> Mode {
        Mode::Nftables(NftCommand::new(runner))
    }

    /// iptables of `variant`, with its programs where `runner` runs them.
    pub fn iptables(runner: Runner, variant: Variant) -> Mode {
        Mode::Iptables(IptablesCommand::with(runner, variant))
    }

    /// Where the programs run.
    pub fn runner(&self) -> &Runner {
        match self {
            Mode::Nftables(n) => &n.runner,
            Mode::Iptables(i) => &i.runner,
        }
    }

    /// `nftables`, `iptables-legacy` or `iptables-nft`, for logs.
    pub fn name(&self) -> String {
        match self {
            Mode::Nftables(_) => "nftables".into(),
            Mode::Iptables(i) => format!("iptables-{}", i.variant),
        }
    }

    /// `nftables` or `iptables` (the agent's state page).
    pub fn family_name(&self) -> &'static str {
        match self {
            Mode::Nftables(_) => "nftables",
            Mode::Iptables(_) => "iptables",
        }
    }

    pub fn is_iptables(&self) -> bool {
        matches!(self, Mode::Iptables(_))
    }

    /// Where this backend's conntrack entries are: the namespace its programs run in (`None`:
    /// an in-memory kernel, which has none).
    pub fn conntrack(&self) -> Option<Conntrack> {
        Conntrack::at(self.runner().place())
    }

    /// What the kernel holds of svcproxy's tables, compared with `plan`.
    pub fn verify(&self, plan: &Plan) -> Result<Vec<Difference>, VerifyError> {
        match self {
            Mode::Nftables(n) => crate::verify::verify_nft(n, plan),
            Mode::Iptables(i) => crate::verify::verify_iptables(i, plan),
        }
    }

    /// Removes what the other modes left (a node switched from one mode to another).
    fn remove_other_modes_rules(&self) {
        match self {
            Mode::Nftables(n) => remove_iptables_leftovers(&n.runner, &Variant::ALL),
            Mode::Iptables(i) => {
                // A node switched from one iptables variant to the other: packets go through
                // both, so the old variant's rules would still catch traffic.
                let other: Vec<Variant> = Variant::ALL
                    .into_iter()
                    .filter(|v| *v != i.variant)
                    .collect();
                remove_iptables_leftovers(&i.runner, &other);
                let tables = [("ip", crate::nft::TABLE), ("ip6", crate::nft::TABLE)];
                let nft = NftCommand::new(i.runner.clone());
                match crate::nft::apply::cleanup(&nft, &tables) {
                    Ok(()) => tracing::debug!("svcproxy's nftables tables are gone"),
                    // No nft on an iptables node is normal.
                    Err(e) => tracing::debug!("removing svcproxy's nftables tables: {e}"),
                }
            }
        }
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

/// What [`Live`] asks of a backend that follows snapshots.
pub trait Engine: Send {
    /// Makes the kernel hold the rules of `snapshot`, writing only what changed when it can.
    fn sync(&mut self, snapshot: Snapshot) -> Result<Outcome, BackendError>;
    /// The last snapshot synced.
    fn snapshot(&self) -> Option<&Snapshot>;
    /// Its plan.
    fn plan(&self) -> Option<&Plan>;
    /// The next sync rewrites everything (to repair drift).
    fn invalidate(&mut self);
}

impl Engine for crate::nft::incremental::Incremental {
    fn sync(&mut self, snapshot: Snapshot) -> Result<Outcome, BackendError> {
        Ok(crate::nft::incremental::Incremental::sync(self, snapshot)?)
    }
    fn snapshot(&self) -> Option<&Snapshot> {
        crate::nft::incremental::Incremental::snapshot(self)
    }
    fn plan(&self) -> Option<&Plan> {
        crate::nft::incremental::Incremental::plan(self)
    }
    fn invalidate(&mut self) {
        crate::nft::incremental::Incremental::invalidate(self)
    }
}

impl Engine for iptables::incremental::Incremental {
    fn sync(&mut self, snapshot: Snapshot) -> Result<Outcome, BackendError> {
        Ok(iptables::incremental::Incremental::sync(self, snapshot)?)
    }
    fn snapshot(&self) -> Option<&Snapshot> {
        iptables::incremental::Incremental::snapshot(self)
    }
    fn plan(&self) -> Option<&Plan> {
        iptables::incremental::Incremental::plan(self)
    }
    fn invalidate(&mut self) {
        iptables::incremental::Incremental::invalidate(self)
    }
}

/// The agent's backend: follows snapshots, writing only what changed.
pub struct Live {
    mode: Mode,
    engine: Box<dyn Engine>,
    /// Whether the other modes' leftovers were looked for (once per process).
    leftovers_done: bool,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("mode", &self.mode).finish()
    }
}

impl Live {
    /// The backend of `mode`, compiling with `config`.
    pub fn new(mode: Mode, config: ProxyConfig) -> Live {
        let engine: Box<dyn Engine> = match &mode {
            Mode::Nftables(n) => {
                Box::new(crate::nft::incremental::Incremental::new(n.clone(), config))
            }
            Mode::Iptables(i) => {
                Box::new(iptables::incremental::Incremental::new(i.clone(), config))
            }
        };
        Live {
            mode,
            engine,
            leftovers_done: false,
        }
    }

    /// Makes the kernel hold the rules of `snapshot`.
    pub fn sync(&mut self, snapshot: Snapshot) -> Result<Outcome, BackendError> {
        if !self.leftovers_done {
            self.mode.remove_other_modes_rules();
            self.leftovers_done = true;
        }
        self.engine.sync(snapshot)
    }

    /// The last snapshot synced.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.engine.snapshot()
    }

    /// The plan of the last snapshot synced.
    pub fn plan(&self) -> Option<&Plan> {
        self.engine.plan()
    }

    /// The next sync rewrites everything.
    pub fn invalidate(&mut self) {
        self.engine.invalidate()
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// What the kernel holds of svcproxy's tables, compared with the plan last synced
    /// (`svcproxy_ruleset_drift`): `None` before the first sync.
    pub fn verify(&self) -> Option<Result<Vec<Difference>, VerifyError>> {
        Some(self.mode.verify(self.plan()?))
    }
}

/// A backend's own rendering of a plan, for a test to edit before it is applied.
#[derive(Debug)]
pub enum Rules<'a> {
    Nftables(&'a mut crate::nft::Ruleset),
    Iptables(&'a mut iptables::Ruleset),
}

/// The one-shot backend: applies compiled plans (partially when it can).
#[derive(Debug)]
pub struct OneShot {
    mode: Mode,
    applier: Applier,
    leftovers_done: bool,
}

#[derive(Debug)]
enum Applier {
    Nftables(Nftables),
    Iptables(Iptables),
}

impl OneShot {
    pub fn new(mode: Mode) -> OneShot {
        let applier = match &mode {
            Mode::Nftables(n) => Applier::Nftables(Nftables::new(n.clone())),
            Mode::Iptables(i) => Applier::Iptables(Iptables::new(i.clone())),
        };
        OneShot {
            mode,
            applier,
            leftovers_done: false,
        }
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Makes the kernel hold the rules of `plan`: the difference from the last apply when it
    /// can express the change, else everything.
    pub fn apply(&mut self, plan: &Plan) -> Result<ApplyReport, BackendError> {
        self.apply_edited(plan, |_| {})
    }

    /// [`OneShot::apply`], after `edit` has changed the backend's rendering of `plan`.
    pub fn apply_edited(
        &mut self,
        plan: &Plan,
        edit: impl FnOnce(Rules<'_>),
    ) -> Result<ApplyReport, BackendError> {
        if !self.leftovers_done {
            self.mode.remove_other_modes_rules();
            self.leftovers_done = true;
        }
        match &mut self.applier {
            Applier::Nftables(n) => {
                let mut rules = crate::nft::render(plan);
                edit(Rules::Nftables(&mut rules));
                Ok(n.apply(rules)?)
            }
            Applier::Iptables(i) => {
                let mut rules = iptables::render(plan);
                edit(Rules::Iptables(&mut rules));
                Ok(i.apply(rules)?)
            }
        }
    }

    /// Replaces everything (the `apply` command).
    pub fn apply_full(&mut self, plan: &Plan) -> Result<ApplyReport, BackendError> {
        self.invalidate();
        self.apply(plan)
    }

    /// Forgets what was applied: the next apply is full.
    pub fn invalidate(&mut self) {
        match &mut self.applier {
            Applier::Nftables(n) => n.invalidate(),
            Applier::Iptables(i) => i.invalidate(),
        }
    }
}

fn remove_iptables_leftovers(runner: &Runner, variants: &[Variant]) {
    match iptables::apply::cleanup(runner, variants) {
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
