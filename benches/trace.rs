//! `svcproxy trace` on the synthetic 10k-Service cluster (10 endpoints each), after loading: the
//! whole answer (plan, index, trace), and one more question once the plan is made (what
//! `services` and a tracer asking many questions pay per question). The bound is 100 ms
//! for the whole answer.

use criterion::{Criterion, criterion_group, criterion_main};
use svcproxy::model::ProxyConfig;
use svcproxy::synthetic;
use svcproxy::trace::{Backend, Query, Tracer};

fn trace(c: &mut Criterion) {
    let mut group = c.benchmark_group("trace");
    group.sample_size(10);
    let snapshot = synthetic::cluster(10_000, 10);
    let config = ProxyConfig {
        cluster_cidrs: vec!["10.128.0.0/9".parse().unwrap()],
        ..ProxyConfig::default()
    };
    // A Service in the middle, from a pod.
    let query = Query {
        source: "10.128.0.1".parse().unwrap(),
        target: format!("{}:80", synthetic::cluster_ip(5_000))
            .parse()
            .unwrap(),
        iifname: None,
        backend: Backend::Nftables,
    };
    group.bench_function("whole-answer/10000x10", |b| {
        b.iter(|| {
            let t = svcproxy::trace::trace_snapshot(&snapshot, &config, &query).unwrap();
            assert_eq!(t.endpoints.len(), 10);
            t
        })
    });
    // The part of the whole answer that is the plan itself (made and freed), for comparison.
    group.bench_function("plan-alone/10000x10", |b| {
        b.iter(|| svcproxy::plan::plan(&snapshot, &config))
    });
    let plan = svcproxy::plan::plan(&snapshot, &config);
    let tracer = Tracer::new(&snapshot, &config, &plan);
    group.bench_function("one-question-after-plan/10000x10", |b| {
        b.iter(|| tracer.trace(&query).unwrap())
    });
    group.finish();
}

criterion_group!(benches, trace);
criterion_main!(benches);
