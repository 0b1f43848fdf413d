//! An in-memory kernel, as kubernetes-sigs/knftables' `Fake` is for kube-proxy: it takes the
//! same programs' input the real kernel does (`nft -f`, `iptables-restore --noflush`,
//! `iptables-save`, `iptables -C/-I/-D`), applies it to a model of the tables, refuses what the
//! kernel refuses (a jump to a missing chain, an element of an undeclared set, the same key
//! with other data), atomically, and records each transaction with its operation count.
//!
//! The backends and the agent loop then run without root, in milliseconds, through
//! `process::Runner::fake(kernel)`; the root tests remain for what only the kernel can tell
//! (packets, conntrack, the real programs' parsers). What a test asserts on is the model, as
//! the kernel would list it, and the transactions it took.
//!
//! It checks structure and references, not types: an element whose key does not fit its
//! set's type is accepted where nft refuses it. `tests/fake_kernel.rs` gives the same scripts
//! to the real kernel and to the fake (as root) and requires them to agree.
//!
//! `nft -j list` is not answered (the fake keeps text, not libnftables' expression trees): a
//! `svcproxy verify` against it reports that it cannot read the tables.

pub mod iptables;
pub mod nft;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::process::{Ran, Runner, Tools};

/// One transaction the kernel was given: what ran, how many operations it held, and whether
/// it was refused (and why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// The program (`nft`, `iptables-nft-restore`, `ip6tables-legacy`, …).
    pub program: String,
    /// Its input (a script or a restore input), or its arguments for a single command.
    pub input: String,
    /// Tables, sets, chains, elements and rules added, flushed or deleted.
    pub operations: usize,
    /// `Some(message)`: refused; the tables kept what they had.
    pub refused: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    nft: nft::Tables,
    /// By program prefix: `iptables-legacy`, `ip6tables-nft`, …
    iptables: BTreeMap<String, iptables::Tables>,
    log: Vec<Transaction>,
    /// How many of the next transactions to refuse (as if the kernel were out of memory).
    refuse: usize,
    /// Programs that are "not installed".
    missing: Vec<String>,
}

/// The in-memory kernel. Share it as `Arc<FakeKernel>`; [`FakeKernel::runner`] is the runner a
/// backend takes.
#[derive(Debug, Default)]
pub struct FakeKernel {
    state: Mutex<State>,
}

const NFT_VERSION: &str = "nftables v1.0.6 (Lester Gooch #5)\n";

impl FakeKernel {
    pub fn new() -> Arc<FakeKernel> {
        Arc::new(FakeKernel::default())
    }

    /// The runner whose programs act on this kernel.
    pub fn runner(self: &Arc<Self>) -> Runner {
        Runner::fake(self.clone())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every transaction so far, refused ones included.
    pub fn transactions(&self) -> Vec<Transaction> {
        self.state().log.clone()
    }

    /// Forgets the transactions so far (the tables stay).
    pub fn clear_transactions(&self) {
        self.state().log.clear();
    }

    /// Refuses the next `n` transactions, whatever they hold, as the kernel refuses one it has
    /// no memory for; the tables keep what they had.
    pub fn refuse_next(&self, n: usize) {
        self.state().refuse = n;
    }

    /// Makes `program` "not installed" (running it fails with `NotFound`).
    pub fn uninstall(&self, program: &str) {
        self.state().missing.push(program.to_string());
    }

    /// The nftables table `family name`, if the kernel has it.
    pub fn nft_table(&self, family: &str, name: &str) -> Option<nft::Table> {
        self.state()
            .nft
            .tables
            .get(&(family.to_string(), name.to_string()))
            .cloned()
    }

    /// All nftables tables.
    pub fn nft_tables(&self) -> nft::Tables {
        self.state().nft.clone()
    }

    /// The iptables tables of one program prefix (`iptables-nft`, `ip6tables-legacy`).
    pub fn iptables(&self, prefix: &str) -> iptables::Tables {
        self.state()
            .iptables
            .get(prefix)
            .cloned()
            .unwrap_or_default()
    }

    /// A change behind svcproxy's back (another tool, an operator): applied as given, not
    /// recorded as one of svcproxy's transactions.
    pub fn tamper_nft(&self, script: &str) -> Result<(), String> {
        nft::apply(&mut self.state().nft, script).map(|_| ())
    }

    /// The iptables counterpart of [`FakeKernel::tamper_nft`]: a restore input for `prefix`.
    pub fn tamper_iptables(&self, prefix: &str, input: &str) -> Result<(), String> {
        self.state()
            .iptables
            .entry(prefix.to_string())
            .or_default()
            .restore(input)
            .map(|_| ())
    }
}

/// `iptables-nft-restore` → (`iptables-nft`, `restore`); `ip6tables-legacy` → (…, ``).
fn iptables_program(program: &str) -> Option<(String, &'static str)> {
    let (family, rest) = program
        .strip_prefix("iptables-")
        .map(|r| ("iptables", r))
        .or_else(|| program.strip_prefix("ip6tables-").map(|r| ("ip6tables", r)))?;
    let (variant, tool) = match rest.split_once('-') {
        Some((v, t)) => (v, t),
        None => (rest, ""),
    };
    let variant = match variant {
        "legacy" => "legacy",
        "nft" => "nft",
        _ => return None,
    };
    let tool = match tool {
        "" => "",
        "restore" => "restore",
        "save" => "save",
        _ => return None,
    };
    Some((format!("{family}-{variant}"), tool))
}

impl Tools for FakeKernel {
    fn run(&self, argv: &[String], input: Option<&str>) -> std::io::Result<Ran> {
        let not_found = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such program");
        let (program, args) = argv.split_first().ok_or_else(not_found)?;
        let mut st = self.state();
        if st.missing.contains(program) {
            return Err(not_found());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if args == ["--version"] {
            return match program.as_str() {
                "nft" => Ok(Ran::ok(NFT_VERSION)),
                "iptables" => Ok(Ran::ok("iptables v1.8.9 (nf_tables)\n")),
                p => match iptables_program(p) {
                    Some((prefix, _)) => {
                        let v = if prefix.ends_with("legacy") {
                            "legacy"
                        } else {
                            "nf_tables"
                        };
                        Ok(Ran::ok(format!("{p} v1.8.9 ({v})\n")))
                    }
                    _ => Err(not_found()),
                },
            };
        }
        let st = &mut *st;
        // The programs that change the tables: one transaction each.
        let (input, result): (String, Result<usize, String>) = match (program.as_str(), &args[..]) {
            ("nft", ["-f", "-"]) => {
                let script = input.unwrap_or_default();
                (
                    script.to_string(),
                    refused_or(&mut st.refuse, || nft::apply(&mut st.nft, script)),
                )
            }
            ("nft", ["-j", "list", "table", family, name]) => {
                return Ok(
                    if st
                        .nft
                        .tables
                        .contains_key(&(family.to_string(), name.to_string()))
                    {
                        Ran::failed(1, "Error: the fake kernel does not list tables as JSON")
                    } else {
                        Ran::failed(
                            1,
                            format!("Error: No such file or directory\nlist table {family} {name}"),
                        )
                    },
                );
            }
            ("nft", ["list", "table", family, name]) => {
                return Ok(
                    match st.nft.tables.get(&(family.to_string(), name.to_string())) {
                        Some(t) => Ran::ok(nft::list(t, family, name)),
                        None => Ran::failed(1, "Error: No such file or directory"),
                    },
                );
            }
            (p, args) => match iptables_program(p) {
                Some((prefix, "restore")) if args.contains(&"--noflush") => {
                    let text = input.unwrap_or_default();
                    let tables = st.iptables.entry(prefix).or_default();
                    (
                        text.to_string(),
                        refused_or(&mut st.refuse, || tables.restore(text)),
                    )
                }
                Some((prefix, "save")) => {
                    let only = match args {
                        ["-t", t] => Some(*t),
                        [] => None,
                        _ => return Ok(Ran::failed(2, format!("{p}: unknown arguments"))),
                    };
                    let text = st
                        .iptables
                        .get(&prefix)
                        .map(|t| t.save(only))
                        .unwrap_or_default();
                    return Ok(Ran::ok(text));
                }
                Some((prefix, "")) => {
                    let owned: Vec<String> = args.iter().map(|a| a.to_string()).collect();
                    let tables = st.iptables.entry(prefix).or_default();
                    if owned.iter().any(|a| a == "-C") {
                        return Ok(match tables.command(&owned) {
                            Ok(true) => Ran::ok(""),
                            Ok(false) => Ran::failed(
                                1,
                                "iptables: Bad rule (does a matching rule exist in that chain?).",
                            ),
                            Err(e) => Ran::failed(2, e),
                        });
                    }
                    (
                        owned.join(" "),
                        refused_or(&mut st.refuse, || tables.command(&owned).map(|_| 1)),
                    )
                }
                _ => return Err(not_found()),
            },
        };
        let (operations, refused, ran) = match result {
            Ok(ops) => (ops, None, Ran::ok("")),
            Err(e) => (0, Some(e.clone()), Ran::failed(1, e)),
        };
        st.log.push(Transaction {
            program: program.clone(),
            input,
            operations,
            refused,
        });
        Ok(ran)
    }
}

/// Runs `apply`, unless a refusal was asked for.
fn refused_or(
    refuse: &mut usize,
    apply: impl FnOnce() -> Result<usize, String>,
) -> Result<usize, String> {
    if *refuse > 0 {
        *refuse -= 1;
        return Err(
            "Error: Could not process rule: Cannot allocate memory (refused by the test)".into(),
        );
    }
    apply()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_reach_the_model_and_refusals_are_recorded() {
        let k = FakeKernel::new();
        let r = k.runner();
        assert!(r.installed("nft"));
        assert!(r.installed("iptables-nft-restore"));
        let ok = r
            .run("nft", &["-f", "-"], Some("table ip t\nadd chain ip t c\n"))
            .unwrap();
        assert!(ok.success(), "{ok:?}");
        k.refuse_next(1);
        let no = r
            .run("nft", &["-f", "-"], Some("delete table ip t\n"))
            .unwrap();
        assert!(!no.success());
        assert!(k.nft_table("ip", "t").is_some());
        let log = k.transactions();
        assert_eq!(log.len(), 2);
        assert_eq!((log[0].operations, log[0].refused.is_none()), (2, true));
        assert!(log[1].refused.is_some());
        let listed = r
            .run("nft", &["-j", "list", "table", "ip", "gone"], None)
            .unwrap();
        assert!(listed.stderr.contains("No such file or directory"));
        k.uninstall("nft");
        assert!(
            r.run("nft", &["-f", "-"], Some(""))
                .unwrap_err()
                .not_found()
        );
    }

    #[test]
    fn iptables_programs_keep_one_model_per_family_and_variant() {
        let k = FakeKernel::new();
        let r = k.runner();
        let ran = r
            .run(
                "iptables-nft-restore",
                &["-w", "5", "--noflush"],
                Some("*nat\n:SVCP-X - [0:0]\nCOMMIT\n"),
            )
            .unwrap();
        assert!(ran.success(), "{ran:?}");
        assert!(
            k.iptables("iptables-nft").tables["nat"]
                .chains
                .contains_key("SVCP-X")
        );
        assert!(k.iptables("iptables-legacy").tables.is_empty());
        let save = r.run("iptables-nft-save", &["-t", "nat"], None).unwrap();
        assert!(save.stdout.contains(":SVCP-X - [0:0]"), "{}", save.stdout);
        let check = r
            .run(
                "iptables-nft",
                &["-w", "5", "-t", "nat", "-C", "OUTPUT", "-j", "SVCP-X"],
                None,
            )
            .unwrap();
        assert_eq!(check.status, Some(1));
        assert!(r.run("ip6tables-nft-save", &[], None).unwrap().success());
        assert!(r.run("iptables-frob-save", &[], None).is_err());
    }
}
