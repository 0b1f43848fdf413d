//! Which iptables the node uses: iptables-legacy (the x_tables kernel API) or iptables-nft (the
//! same commands, stored as nftables rules). Both can be installed and both can hold rules, but
//! packets go through both, so rules split over the two confuse everyone: svcproxy writes where
//! the node's other tools (kubelet, the CNI plugin, a host firewall) already write.
//!
//! The decision, in order, as Kubernetes' own iptables-wrappers make it:
//! 1. the kubelet's marker chains (`KUBE-IPTABLES-HINT` in mangle, or the older
//!    `KUBE-KUBELET-CANARY`): the variant that has them is the kubelet's;
//! 2. else the variant holding more rules (`iptables-*-save` plus `ip6tables-*-save`, lines
//!    starting with `-`; svcproxy's own rules count, so a restart keeps its choice);
//! 3. else (no rules anywhere) the system's `iptables` (`iptables --version` says `legacy` or
//!    `nf_tables`); without one, whichever variant is installed, nft first.

use crate::process::Runner;

/// An iptables implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    Legacy,
    Nft,
}

impl Variant {
    pub const ALL: [Variant; 2] = [Variant::Legacy, Variant::Nft];

    /// `legacy` or `nft`, as in the program names (`iptables-legacy-restore`).
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Legacy => "legacy",
            Variant::Nft => "nft",
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Variant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "legacy" => Ok(Variant::Legacy),
            "nft" => Ok(Variant::Nft),
            other => Err(format!("{other:?}: expected legacy or nft")),
        }
    }
}

/// What was found about one variant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Its `*-save` programs run.
    pub installed: bool,
    /// The kubelet's marker chains are there.
    pub kubelet_hint: bool,
    /// Rules in all tables of both families.
    pub rules: usize,
}

/// Everything the decision looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evidence {
    pub legacy: Seen,
    pub nft: Seen,
    /// What the plain `iptables` command is, if there is one.
    pub system: Option<Variant>,
}

/// The decision, with the reason (for the log). `None`: no variant is installed.
pub fn decide(e: &Evidence) -> Option<(Variant, String)> {
    let (l, n) = (e.legacy, e.nft);
    match (l.installed, n.installed) {
        (false, false) => return None,
        (true, false) => {
            return Some((Variant::Legacy, "only iptables-legacy is installed".into()));
        }
        (false, true) => return Some((Variant::Nft, "only iptables-nft is installed".into())),
        (true, true) => {}
    }
    if l.kubelet_hint != n.kubelet_hint {
        let v = if l.kubelet_hint {
            Variant::Legacy
        } else {
            Variant::Nft
        };
        return Some((
            v,
            format!("the kubelet's marker chains are in iptables-{v}"),
        ));
    }
    if l.rules != n.rules {
        let v = if l.rules > n.rules {
            Variant::Legacy
        } else {
            Variant::Nft
        };
        return Some((
            v,
            format!(
                "iptables-{v} holds more rules (legacy {}, nft {})",
                l.rules, n.rules
            ),
        ));
    }
    let v = e.system.unwrap_or(Variant::Nft);
    let why = match e.system {
        Some(_) => format!("no rules in either; the system's iptables is iptables-{v}"),
        None => "no rules in either and no system iptables; nft".to_string(),
    };
    Some((v, why))
}

/// Looks at the node (where `runner` runs the programs).
pub fn evidence(runner: &Runner) -> Evidence {
    let run = |program: &str, args: &[&str]| -> Option<String> {
        let ran = runner.run(program, args, None).ok()?;
        ran.success().then_some(ran.stdout)
    };
    let seen = |v: Variant| {
        let mut s = Seen::default();
        for family in ["iptables", "ip6tables"] {
            let Some(text) = run(&format!("{family}-{v}-save"), &[]) else {
                continue;
            };
            s.installed = true;
            s.rules += text.lines().filter(|l| l.starts_with('-')).count();
            s.kubelet_hint |= text.lines().any(|l| {
                l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY ")
            });
        }
        s
    };
    let system = run("iptables", &["--version"]).and_then(|v| {
        if v.contains("legacy") {
            Some(Variant::Legacy)
        } else if v.contains("nf_tables") {
            Some(Variant::Nft)
        } else {
            None
        }
    });
    Evidence {
        legacy: seen(Variant::Legacy),
        nft: seen(Variant::Nft),
        system,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(legacy: Seen, nft: Seen, system: Option<Variant>) -> Option<Variant> {
        decide(&Evidence {
            legacy,
            nft,
            system,
        })
        .map(|(v, _)| v)
    }

    const EMPTY: Seen = Seen {
        installed: true,
        kubelet_hint: false,
        rules: 0,
    };

    #[test]
    fn kubelet_hint_then_rule_count_then_system_default() {
        let hinted = Seen {
            kubelet_hint: true,
            rules: 3,
            ..EMPTY
        };
        let busy = Seen { rules: 50, ..EMPTY };
        assert_eq!(
            both(hinted, busy, Some(Variant::Nft)),
            Some(Variant::Legacy)
        );
        assert_eq!(both(busy, hinted, None), Some(Variant::Nft));
        assert_eq!(both(busy, EMPTY, Some(Variant::Nft)), Some(Variant::Legacy));
        assert_eq!(both(EMPTY, busy, Some(Variant::Legacy)), Some(Variant::Nft));
        assert_eq!(
            both(EMPTY, EMPTY, Some(Variant::Legacy)),
            Some(Variant::Legacy)
        );
        assert_eq!(both(EMPTY, EMPTY, None), Some(Variant::Nft));
        let missing = Seen::default();
        assert_eq!(both(missing, busy, None), Some(Variant::Nft));
        assert_eq!(
            both(EMPTY, missing, Some(Variant::Nft)),
            Some(Variant::Legacy)
        );
        assert_eq!(both(missing, missing, None), None);
    }
}
