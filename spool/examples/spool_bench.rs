//! Spool throughput in three phases, each timed on its own: enqueue (many concurrent
//! callers), lease (4 workers lease everything, holding the leases), complete (the same 4
//! workers complete what they hold).
//!
//!   cargo run --release -p sluice-spool --example spool_bench -- local --dir /tmp/x
//!   cargo run --release -p sluice-spool --features rados --example spool_bench -- rados --conf C --pool P
//!
//! Options: --messages N (20000), --concurrency C (64 enqueuers), --batch B (messages per
//! enqueue, 1), --body BYTES (4096), --lease-batch L (256), --enqueue-only (stop after
//! enqueueing and report the RSS with everything queued), --keep (reuse --dir's contents). Prints one JSON line of results.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_spool::conformance::message;
use sluice_spool::{LeaseRequest, LocalSpool, LocalSpoolOptions, Spool};

/// Resident set size of this process, MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
    kb / 1024.0
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = args.get(1).cloned().unwrap_or_else(|| "local".into());
    let messages: usize = arg(&args, "--messages", "20000").parse().unwrap();
    let concurrency: usize = arg(&args, "--concurrency", "64").parse().unwrap();
    let batch: usize = arg(&args, "--batch", "1").parse().unwrap();
    let body: usize = arg(&args, "--body", "4096").parse().unwrap();
    let lease_batch: usize = arg(&args, "--lease-batch", "256").parse().unwrap();

    let spool: Arc<dyn Spool> = match backend.as_str() {
        "local" => {
            let dir = arg(&args, "--dir", "/tmp/sluice-spool-bench");
            if !args.iter().any(|a| a == "--keep") {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Arc::new(LocalSpool::open(LocalSpoolOptions::new(&dir)).unwrap())
        }
        #[cfg(feature = "rados")]
        "rados" => {
            let mut o = sluice_spool::RadosSpoolOptions::new(arg(&args, "--conf", "ceph.conf"), arg(&args, "--pool", "sluice"));
            o.namespace = Some(format!("bench-{}", sluice_spool::MessageId::new()));
            o.shards = arg(&args, "--shards", "16").parse().unwrap();
            Arc::new(sluice_spool::RadosSpool::open(o).await.unwrap())
        }
        other => panic!("unknown backend {other} (rados needs --features rados)"),
    };
    let payload = Bytes::from(vec![b'x'; body]);

    // Enqueue: `concurrency` tasks, each enqueueing batches of `batch` messages.
    let per_task = messages / concurrency / batch;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (spool, payload) = (spool.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                let b: Vec<_> = (0..batch)
                    .map(|j| {
                        let mut m = message(&format!("d{}.test", (t + j) % 50), &[&format!("{t}-{i}-{j}@x.test")]);
                        m.body = payload.clone();
                        m
                    })
                    .collect();
                spool.enqueue(b).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let enq = started.elapsed();
    let total = per_task * concurrency * batch;
    let rss_queued_mib = rss_mib();
    if args.iter().any(|a| a == "--enqueue-only") {
        println!(
            "{{\"backend\":\"{backend}\",\"messages\":{total},\"enqueue_per_s\":{:.0},\"rss_mib_with_all_queued\":{rss_queued_mib:.0},\"queued\":{}}}",
            total as f64 / enq.as_secs_f64(),
            spool.counts().await.unwrap().queued
        );
        return;
    }

    // Lease until empty, 4 workers, holding every lease; then complete them all.
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let spool = spool.clone();
        workers.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut last_lease = Instant::now();
            let mut empty = 0;
            loop {
                let got = spool.lease(LeaseRequest::new(lease_batch, Duration::from_secs(3600))).await.unwrap();
                if got.is_empty() {
                    empty += 1;
                    if empty > 3 {
                        return (held, last_lease);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                empty = 0;
                held.extend(got.into_iter().map(|l| l.lease));
                last_lease = Instant::now();
            }
        }));
    }
    let mut held = Vec::new();
    let mut done = started;
    for w in workers {
        let (leases, last) = w.await.unwrap();
        held.push(leases);
        done = done.max(last);
    }
    // Until the last lease that got messages: the polls that found the queue empty are not work.
    let lease = done - started;
    let leased: usize = held.iter().map(Vec::len).sum();

    let started = Instant::now();
    let mut workers = Vec::new();
    for leases in held {
        let spool = spool.clone();
        workers.push(tokio::spawn(async move {
            for chunk in leases.chunks(lease_batch) {
                for r in futures::future::join_all(chunk.iter().map(|l| spool.complete(l))).await {
                    r.unwrap();
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let complete = started.elapsed();
    println!(
        "{{\"backend\":\"{backend}\",\"messages\":{total},\"body_bytes\":{body},\"concurrency\":{concurrency},\"batch\":{batch},\"enqueue_per_s\":{:.0},\"lease_per_s\":{:.0},\"complete_per_s\":{:.0},\"leased\":{leased}}}",
        total as f64 / enq.as_secs_f64(),
        leased as f64 / lease.as_secs_f64(),
        leased as f64 / complete.as_secs_f64(),
    );
}
