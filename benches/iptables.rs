//! The iptables backend at scale, in a private network namespace: a full sync into an empty
//! namespace (cold), a full sync over the same rules (what a periodic resync costs), and one
//! changed endpoint, through a whole compile (plan, render, diff, restore: the iptables mode
//! before it had an incremental path) and through the agent's incremental backend (plan and
//! render the changed Service, restore its chain), and a new Service through the incremental
//! backend, for each iptables variant.
//!
//! `cargo bench --bench iptables -- [--services 1000,10000] [--endpoints 10] [--runs 3]
//! [--variants legacy,nft]` (as root). Prints a Markdown table; times are medians of `--runs`.

use std::time::{Duration, Instant};

use svcproxy::iptables::incremental::Incremental;
use svcproxy::iptables::{Iptables, IptablesCommand, Variant};
use svcproxy::model::ProxyConfig;
use svcproxy::report::SyncKind;

#[allow(dead_code)]
mod support;
use support::{Netns, arg, median};

fn fmt(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

fn main() {
    let sizes: Vec<usize> = arg("--services", "1000,10000")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let endpoints: usize = arg("--endpoints", "10").parse().unwrap();
    let runs: usize = arg("--runs", "3").parse().unwrap();
    let variants: Vec<Variant> = arg("--variants", "legacy,nft")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    println!(
        "| variant | Services | rules (IPv4) | chains (IPv4) | render | cold full sync | full resync (median of {runs}) | one endpoint changed, whole compile: plan + render + diff + restore (median of {runs}) | one endpoint changed, incremental: sync start → kernel (median of {runs}) | new Service, incremental (median of {runs}) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &variant in &variants {
        for &n in &sizes {
            let ns = Netns::new(&format!("{variant}-{n}"));
            let cmd = IptablesCommand::in_netns(&ns.0, variant);
            let config = ProxyConfig {
                cluster_cidrs: vec!["10.128.0.0/9".parse().unwrap()],
                ..ProxyConfig::default()
            };
            let mut snapshot = svcproxy::synthetic::cluster(n, endpoints);
            let t = Instant::now();
            let plan = svcproxy::plan::plan(&snapshot, &config);
            let rules = svcproxy::iptables::render(&plan);
            let render = t.elapsed();
            let v4 = &rules.families[0];
            let rule_count: usize = v4.tables.iter().map(|t| t.rule_count()).sum();
            let chain_count: usize = v4.tables.iter().map(|t| t.chains.len()).sum();

            let mut backend = Iptables::new(cmd.clone());
            let cold = backend.apply(rules.clone()).expect("cold full sync");
            eprintln!("{variant} {n}: cold {:?}", cold.duration);
            let mut full = Vec::new();
            for _ in 0..runs {
                backend.invalidate();
                full.push(backend.apply(rules.clone()).expect("full").duration);
            }
            eprintln!("{variant} {n}: full {full:?}");
            // One endpoint of one Service replaced, back and forth: the whole compile (what
            // the iptables mode did before it had an incremental path) ...
            let mut whole = Vec::new();
            let key = snapshot.slices.keys().nth(n / 2).unwrap().clone();
            let flip = |snapshot: &mut svcproxy::model::Snapshot, i: usize| {
                let slice = std::sync::Arc::make_mut(snapshot.slices.get_mut(&key).unwrap());
                slice.endpoints[1].address = format!("10.127.0.{}", i % 2 + 1).parse().unwrap();
            };
            for i in 0..runs {
                flip(&mut snapshot, i);
                let t = Instant::now();
                let plan = svcproxy::plan::plan(&snapshot, &config);
                let r = backend
                    .apply(svcproxy::iptables::render(&plan))
                    .expect("partial");
                assert_eq!(r.kind, SyncKind::Partial);
                whole.push(t.elapsed());
            }
            eprintln!("{variant} {n}: whole compile {whole:?}");
            drop(backend);
            // ... and the agent's incremental backend, from a full sync of the same rules.
            let mut inc = Incremental::new(cmd.clone(), config.clone());
            inc.sync(snapshot.clone()).expect("full sync");
            let mut partial = Vec::new();
            for i in 0..runs {
                flip(&mut snapshot, i + 1);
                let out = inc.sync(snapshot.clone()).expect("incremental");
                assert_eq!(out.report.kind, SyncKind::Partial);
                assert_eq!(out.services_compiled, 1, "{:?}", out.fallback);
                partial.push(out.compile + out.report.duration);
            }
            eprintln!("{variant} {n}: incremental {partial:?}");
            let mut added = Vec::new();
            for _ in 0..runs {
                let mut next = snapshot.clone();
                let i = n + 1;
                let svc = svcproxy::synthetic::service(i);
                next.services.insert(svc.id.clone(), svc.into());
                let slice = svcproxy::synthetic::slice(i, endpoints);
                next.slices.insert(slice.id.clone(), slice.into());
                let out = inc.sync(next).expect("new Service");
                assert_eq!(out.services_compiled, 1, "{:?}", out.fallback);
                added.push(out.compile + out.report.duration);
                inc.sync(snapshot.clone()).expect("Service deleted");
            }
            eprintln!("{variant} {n}: new Service {added:?}");
            println!(
                "| iptables-{variant} | {n} | {rule_count} | {chain_count} | {} | {} | {} | {} | {} | {} |",
                fmt(render),
                fmt(cold.duration),
                fmt(median(full)),
                fmt(median(whole)),
                fmt(median(partial)),
                fmt(median(added)),
            );
        }
    }
}
