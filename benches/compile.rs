//! The pure part of a sync: snapshot → plan → ruleset, and the full sync's script, at 1k, 10k and
//! 50k Services; and the incremental compile of a one-endpoint change at 10k (snapshot → the
//! commands to send).

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use svcproxy::model::ProxyConfig;
use svcproxy::nft::apply::NftCommand;
use svcproxy::nft::incremental::Incremental;
use svcproxy::process::{Ran, Runner, System, Tools};
use svcproxy::synthetic;

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    let config = ProxyConfig::default();
    for (services, endpoints) in [(1_000, 10), (10_000, 10), (50_000, 5)] {
        // Inputs are built inside the benchmark, so that one run alone (a filter naming it)
        // has a heap that no other benchmark's data fragmented.
        // The compile proper, and the writing of a full sync's script (partial syncs write
        // only their commands).
        let id = format!("{services}x{endpoints}");
        group.bench_function(BenchmarkId::new("plan+render", &id), |b| {
            let snapshot = synthetic::cluster(services, endpoints);
            b.iter_with_large_drop(|| svcproxy::compile(&snapshot, &config))
        });
        group.bench_function(BenchmarkId::new("full-script", &id), |b| {
            let (_, ruleset) = svcproxy::compile(&synthetic::cluster(services, endpoints), &config);
            b.iter(|| ruleset.script().len())
        });
    }
    group.finish();
}

/// Two snapshots that differ by one endpoint, synced alternately: each sync compiles one
/// Service. Timed: `Outcome::compile`, everything before nft runs (nft is replaced by a program
/// that reads the script and discards it).
fn incremental(c: &mut Criterion) {
    let mut group = c.benchmark_group("incremental");
    group.sample_size(20);
    group.bench_function("one-endpoint-changed/10000x10", |bench| {
        let a = synthetic::cluster(10_000, 10);
        let mut b = a.clone();
        std::sync::Arc::make_mut(synthetic::nth_mut(&mut b.slices, 5000)).endpoints[3].address =
            "10.255.0.1".parse().unwrap();
        let discard = NftCommand::new(Runner::fake(Arc::new(Discard)));
        let mut backend = Incremental::new(discard, ProxyConfig::default());
        backend.sync(a.clone()).unwrap();
        let mut flip = false;
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                flip = !flip;
                let next = if flip { b.clone() } else { a.clone() };
                let outcome = backend.sync(next).unwrap();
                assert_eq!(outcome.services_compiled, 1);
                total += outcome.compile;
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, compile, incremental);
criterion_main!(benches);

/// In place of nft: a program that reads the script and discards it, so that a sync costs
/// what it did when nft was replaced by `sh -c 'cat >/dev/null'`.
#[derive(Debug)]
struct Discard;

impl Tools for Discard {
    fn run(&self, _argv: &[String], input: Option<&str>) -> std::io::Result<Ran> {
        let argv = ["sh", "-c", "cat >/dev/null"].map(String::from);
        System.run(&argv, input)
    }
}
