//! The two backends behind one interface, for the agent and the `apply` command: each sync
//! hands over the plan (and the nftables ruleset the compiler already rendered), and the
//! selected backend renders and applies its own form of it.
//!
//! The first apply of a process also removes the other backend's leftovers (a node switched
//! from one mode to the other), so that only one set of svcproxy rules decides.

use crate::iptables::{self, Iptables, IptablesError, Variant};
use crate::nft::apply::{ApplyError, ApplyReport, NftCommand, Nftables};
use crate::plan::Plan;

/// Which backend programs the kernel, and how to run it.
#[derive(Debug)]
pub struct Backend {
    kind: Kind,
    /// Words that run a program where the rules go (`ip netns exec NS`), empty for here.
    prefix: Vec<String>,
    /// Whether the other backend's leftovers were looked for (once per process).
    leftovers_done: bool,
}

#[derive(Debug)]
enum Kind {
    Nftables(Nftables),
    Iptables(Iptables),
}

/// An apply that failed, from either backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Nftables(#[from] ApplyError),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
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
        match iptables {
            None => Backend {
                // `nft`'s own words minus the program: the namespace wrapper, if any.
                prefix: nft.program[..nft.program.len().saturating_sub(1)].to_vec(),
                kind: Kind::Nftables(Nftables::new(nft)),
                leftovers_done: false,
            },
            Some(cmd) => Backend {
                prefix: cmd.prefix.clone(),
                kind: Kind::Iptables(Iptables::new(cmd)),
                leftovers_done: false,
            },
        }
    }

    /// `nftables`, `iptables-legacy` or `iptables-nft`, for logs.
    pub fn name(&self) -> String {
        match &self.kind {
            Kind::Nftables(_) => "nftables".into(),
            Kind::Iptables(i) => format!("iptables-{}", i.command().variant),
        }
    }

    /// This backend's form of the plan; `ruleset` is the compiler's nftables rendering.
    pub fn desired(&self, plan: &Plan, ruleset: crate::nft::Ruleset) -> Desired {
        match &self.kind {
            Kind::Nftables(_) => Desired::Nftables(ruleset),
            Kind::Iptables(_) => Desired::Iptables(iptables::render(plan)),
        }
    }

    /// Applies (partially when possible). The first apply of a process also removes the other
    /// backend's rules.
    pub fn apply(&mut self, desired: Desired) -> Result<ApplyReport, BackendError> {
        if !self.leftovers_done {
            self.remove_other_backends_rules();
            self.leftovers_done = true;
        }
        match (&mut self.kind, desired) {
            (Kind::Nftables(n), Desired::Nftables(r)) => Ok(n.apply(r)?),
            (Kind::Iptables(i), Desired::Iptables(r)) => Ok(i.apply(r)?),
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
            Kind::Iptables(i) => i.invalidate(),
        }
    }

    fn remove_other_backends_rules(&self) {
        match &self.kind {
            Kind::Nftables(_) => remove_iptables_leftovers(&self.prefix, &Variant::ALL),
            Kind::Iptables(i) => {
                // A node switched from one iptables variant to the other: packets go through
                // both, so the old variant's rules would still catch traffic.
                let other: Vec<Variant> = Variant::ALL
                    .into_iter()
                    .filter(|v| *v != i.command().variant)
                    .collect();
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
