//! What `ferryctl` spends at startup: probing this machine, and planning for each
//! hardware profile. `cargo bench -p ferry-benches --bench startup`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

fn probe(c: &mut Criterion) {
    let opts = hw::ProbeOptions::default();
    c.bench_function("probe/this-machine", |b| b.iter(|| black_box(hw::probe(&opts))));
}

fn plan(c: &mut Criterion) {
    let cfg = control::config::Config::default();
    let mut g = c.benchmark_group("plan");
    for (name, caps) in ferry_benches::fixtures() {
        g.bench_function(&name, |b| b.iter(|| black_box(control::planner::plan(&caps, &cfg).unwrap())));
    }
    g.finish();
}

criterion_group!(benches, probe, plan);
criterion_main!(benches);
