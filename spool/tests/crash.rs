//! kill -9 while enqueueing loses no acknowledged message.
//!
//! The test re-runs its own binary as a child (`child_writer`, ignored unless
//! `SLUICE_CRASH_DIR` is set) that enqueues from several tasks and prints `ACK <id>` after
//! each enqueue returned. The parent SIGKILLs it at a random moment, reopens the spool and
//! checks that every acknowledged message is there with its body.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_spool::conformance::message;
use sluice_spool::{LeaseRequest, LocalSpool, LocalSpoolOptions, MessageId, Spool};

const ROUNDS: usize = 20;

#[test]
#[ignore = "child process of kill9_loses_no_acknowledged_message"]
fn child_writer() {
    let Ok(dir) = std::env::var("SLUICE_CRASH_DIR") else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let spool = Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir)).unwrap());
        let out = Arc::new(Mutex::new(std::io::stdout()));
        println!("READY");
        let mut tasks = Vec::new();
        for t in 0..8 {
            let (spool, out) = (spool.clone(), out.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let n = 1 + (i as usize % 3);
                    let batch: Vec<_> =
                        (0..n).map(|j| message(&format!("q{t}.test"), &[&format!("{i}-{j}@q{t}.test")])).collect();
                    let ids: Vec<_> = batch.iter().map(|m| m.id()).collect();
                    spool.enqueue(batch).await.unwrap();
                    let mut out = out.lock().unwrap();
                    for id in ids {
                        writeln!(out, "ACK {id}").unwrap();
                    }
                    out.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn kill9_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked_total: HashSet<MessageId> = HashSet::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args(["--exact", "child_writer", "--ignored", "--nocapture", "--test-threads=1"])
            .env("SLUICE_CRASH_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.ends_with("READY") {
                    let _ = ready_tx.send(());
                }
                if let Some(id) = line.strip_prefix("ACK ") {
                    acked.push(id.parse::<MessageId>().unwrap());
                }
            }
            acked
        });
        // Once the child has opened the spool (on a busy machine that alone can take a
        // while), let it run for a random while, then kill it without warning.
        ready.recv_timeout(Duration::from_secs(60)).expect("the child never opened the spool");
        let delay = 100 + rand::random::<u64>() % 400;
        std::thread::sleep(Duration::from_millis(delay));
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        assert!(!acked.is_empty() || round > 0, "child acknowledged nothing in {delay} ms");
        acked_total.extend(acked);

        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let spool = LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap();
            for id in &acked_total {
                let meta = spool.get(*id).await.unwrap();
                assert!(meta.is_some(), "round {round}: acknowledged message {id} lost after kill -9");
            }
            let c = spool.counts().await.unwrap();
            assert!(c.queued as usize >= acked_total.len());
            assert_eq!(c.leased, 0);
        });
    }
    // Finally every acknowledged message can be leased with its body.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let spool = LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap();
        let mut seen = HashSet::new();
        loop {
            let got = spool.lease(LeaseRequest::new(5000, Duration::from_secs(60))).await.unwrap();
            if got.is_empty() {
                break;
            }
            for l in got {
                assert!(l.body.starts_with(format!("Subject: {}", l.meta.id).as_bytes()));
                seen.insert(l.meta.id);
            }
        }
        let missing = acked_total.difference(&seen).count();
        assert_eq!(missing, 0, "{missing} acknowledged messages not leasable");
        eprintln!("{} acknowledged messages over {ROUNDS} kill -9 rounds, all present", acked_total.len());
    });
}
