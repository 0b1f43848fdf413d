//! `svcproxy verify` at scale, in a private network namespace: the synthetic cluster applied
//! once, then the time to read svcproxy's tables back from the kernel and compare them with the
//! plan, split into its parts (reading, parsing, the desired side, the comparison), for the
//! nftables mode and each iptables variant.
//!
//! In the nftables mode also the agent's drift check (`verify::verify_nft`, which keeps each
//! set as a digest): its time, and how far it lifts this process's peak RSS above the steady
//! state (the snapshot and plan held, as in the agent; VmHWM reset through `clear_refs`).
//!
//! `cargo bench --bench verify -- [--services 10000] [--endpoints 10] [--runs 3]
//! [--modes nftables,legacy,nft]` (as root). Prints a Markdown table; times are medians.

use std::time::{Duration, Instant};

use svcproxy::iptables::{Iptables, IptablesCommand, Variant};
use svcproxy::model::{IpFamily, ProxyConfig};
use svcproxy::nft::apply::{NftCommand, Nftables};
use svcproxy::verify;

#[allow(dead_code)]
mod support;
use support::{Netns, arg, median};

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// `VmHWM` and `VmRSS` of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Gives freed memory back and resets VmHWM to the current RSS (`clear_refs` 5), so that the
/// next reading is the peak of what follows.
fn reset_peak() {
    // SAFETY: malloc_trim takes no pointers; it only returns the allocator's free pages.
    unsafe { libc::malloc_trim(0) };
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let services: usize = arg("--services", "10000").parse().expect("--services N");
    let endpoints: usize = arg("--endpoints", "10").parse().expect("--endpoints N");
    let runs: usize = arg("--runs", "3").parse().expect("--runs N");
    let modes = arg("--modes", "nftables,legacy,nft");
    let snapshot = svcproxy::synthetic::cluster(services, endpoints);
    let plan = svcproxy::plan::plan(&snapshot, &ProxyConfig::default());
    let name = format!("{services} Services x {endpoints} endpoints");
    println!("| cluster | mode | measurement | median of {runs} |");
    println!("|---|---|---|---|");
    for mode in modes.split(',') {
        let ns = Netns::new(mode);
        let (mut read, mut desired, mut compare, mut total) = (vec![], vec![], vec![], vec![]);
        if mode == "nftables" {
            let nft = NftCommand::in_netns(&ns.0);
            Nftables::new(nft.clone())
                .apply_full(svcproxy::nft::render(&plan))
                .expect("the ruleset applies");
            for _ in 0..runs {
                let t = Instant::now();
                let observed = verify::read_nft(&nft).unwrap();
                read.push(t.elapsed());
                let t2 = Instant::now();
                let want = verify::desired_nft(&svcproxy::nft::render(&plan));
                desired.push(t2.elapsed());
                let t3 = Instant::now();
                let d = verify::compare_nft(&want, &observed);
                compare.push(t3.elapsed());
                total.push(t.elapsed());
                assert!(d.is_empty(), "{} differences: {}", d.len(), d[0]);
            }
            let (mut drift, mut lift) = (vec![], vec![]);
            for _ in 0..runs {
                reset_peak();
                let (_, before) = memory();
                let t = Instant::now();
                let d = verify::verify_nft(&nft, &plan).unwrap();
                drift.push(t.elapsed());
                lift.push(memory().0 - before);
                assert!(d.is_empty(), "{} differences: {}", d.len(), d[0]);
            }
            lift.sort_by(f64::total_cmp);
            println!(
                "| {name} | nftables | the drift check (verify_nft), all of it | {} |",
                ms(median(drift))
            );
            println!(
                "| {name} | nftables | the drift check: peak RSS above the steady {:.0} MiB | {:.1} MiB |",
                memory().1,
                lift[lift.len() / 2]
            );
        } else {
            let variant = match mode {
                "legacy" => Variant::Legacy,
                _ => Variant::Nft,
            };
            let cmd = IptablesCommand::in_netns(&ns.0, variant);
            let ruleset = svcproxy::iptables::render(&plan);
            Iptables::new(cmd.clone())
                .apply_full(ruleset.clone())
                .expect("the rules apply");
            let families: Vec<IpFamily> = ruleset.families.iter().map(|f| f.family).collect();
            for _ in 0..runs {
                let t = Instant::now();
                let observed = verify::read_iptables(&cmd, &families).unwrap();
                read.push(t.elapsed());
                let t2 = Instant::now();
                let want = verify::desired_iptables(&svcproxy::iptables::render(&plan));
                desired.push(t2.elapsed());
                let t3 = Instant::now();
                let d = verify::compare_iptables(&want, &observed);
                compare.push(t3.elapsed());
                total.push(t.elapsed());
                assert!(d.is_empty(), "{} differences: {}", d.len(), d[0]);
            }
        }
        let label = if mode == "nftables" {
            "nftables".to_string()
        } else {
            format!("iptables-{mode}")
        };
        for (what, v) in [
            ("read back and parse (nft -j list table / *-save)", read),
            ("the desired side (render + normalise)", desired),
            ("compare", compare),
            ("verify, all of it", total),
        ] {
            println!("| {name} | {label} | {what} | {} |", ms(median(v)));
        }
    }
}
