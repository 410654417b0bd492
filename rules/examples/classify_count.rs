//! Classifies the deferrals and bounces of the `classify` bench's mix N times, for counting
//! instructions where wall-clock time is too noisy (a shared machine):
//!
//! ```sh
//! cargo build --release -p sluice-rules --example classify_count
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/classify_count 0
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/classify_count 20000
//! ```
//!
//! (Ir of the second run − Ir of the first) / (20000 × 20) is the instruction count of one
//! classification: both runs load the table and warm the lazy DFAs up the same way.

use std::hint::black_box;

use sluice_rules::{Classify, Context, Engine, DEFAULT_TABLE};

#[path = "../benches/support/mix.rs"]
mod mix;

fn main() {
    let passes: usize = std::env::args().nth(1).map_or(Ok(1000), |a| a.parse()).expect("usage: classify_count PASSES");
    let engine = Engine::load(vec![DEFAULT_TABLE.into()]).expect("the default table compiles");
    let mut failures: Vec<mix::Case> = mix::mix().into_iter().filter(|m| m.reply.class() != 2).collect();
    // An optional second argument keeps only that failure (0-based), to see what each costs.
    if let Some(i) = std::env::args().nth(2) {
        let i: usize = i.parse().expect("usage: classify_count PASSES [CASE]");
        failures = vec![failures.swap_remove(i)];
        eprintln!("{}", failures[0].reply);
    }
    let run = |n: usize| {
        for _ in 0..n {
            for m in &failures {
                let ctx = Context { stage: Some(m.stage), mx_host: Some(m.mx), domain: Some(m.domain) };
                black_box(engine.classify(black_box(&m.reply), &ctx));
            }
        }
    };
    // Warm-up: the lazy DFAs build their states on first use.
    run(200);
    run(passes);
    let o = engine.classify(&failures[0].reply, &Context { stage: Some(failures[0].stage), mx_host: Some(failures[0].mx), domain: Some(failures[0].domain) });
    println!("{} classifications; the first is decided by {}", passes * failures.len(), o.rule_id);
}
