//! The pure part of a sync: snapshot → plan → nftables script, at 1k, 10k and 50k Services.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use svcproxy::model::ProxyConfig;
use svcproxy::synthetic;

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    for (services, endpoints) in [(1_000, 10), (10_000, 10), (50_000, 5)] {
        let snapshot = synthetic::cluster(services, endpoints);
        let config = ProxyConfig::default();
        group.bench_with_input(
            BenchmarkId::new("plan+render+script", format!("{services}x{endpoints}")),
            &snapshot,
            |b, s| {
                b.iter(|| {
                    let (_, ruleset) = svcproxy::compile(s, &config);
                    ruleset.script().len()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, compile);
criterion_main!(benches);
