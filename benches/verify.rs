//! `svcproxy verify` at scale, in a private network namespace: the synthetic cluster applied
//! once, then the time to read svcproxy's tables back from the kernel and compare them with the
//! plan, split into its parts (reading, parsing, the desired side, the comparison), for the
//! nftables mode and each iptables variant.
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
