//! Classifications per second of the shipped default table on a realistic mix of replies.
//!
//! The mix follows what a bulk sender sees: most replies accept the message, a minority
//! defer or bounce, spread over the big providers and generic servers, with provider context
//! (MX host, domain) as the MTA passes it. Run with
//! `cargo bench -p sluice-rules --bench classify`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_rules::{Classify, Context, Engine, DEFAULT_TABLE};

#[path = "support/mix.rs"]
mod mix;
use mix::{mix, Case};

fn bench(c: &mut Criterion) {
    let engine = Engine::load(vec![DEFAULT_TABLE.into()]).expect("the default table compiles");
    let mix = mix();
    let mut g = c.benchmark_group("default_table");
    g.throughput(Throughput::Elements(mix.len() as u64));
    g.bench_function("realistic_mix_100_replies", |b| {
        b.iter(|| {
            for m in &mix {
                let ctx = Context { stage: Some(m.stage), mx_host: Some(m.mx), domain: Some(m.domain) };
                black_box(engine.classify(black_box(&m.reply), &ctx));
            }
        })
    });
    let failures: Vec<&Case> = mix.iter().filter(|m| m.reply.class() != 2).collect();
    g.throughput(Throughput::Elements(failures.len() as u64));
    g.bench_function("deferrals_and_bounces_only", |b| {
        b.iter(|| {
            for m in &failures {
                let ctx = Context { stage: Some(m.stage), mx_host: Some(m.mx), domain: Some(m.domain) };
                black_box(engine.classify(black_box(&m.reply), &ctx));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
