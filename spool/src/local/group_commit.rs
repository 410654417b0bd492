//! Group commit: one fsync for every enqueue that arrives while the previous one runs.
//!
//! Callers hand their batch to a dedicated thread and await its answer. The thread takes
//! whatever is waiting (up to a size limit), writes it all, fsyncs once and answers every
//! caller. There is no timer: under light load each enqueue gets its own fsync at once;
//! under heavy load batches grow by themselves while the disk is busy.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::Store;
use crate::{Message, SpoolError};

struct Request {
    batch: Vec<Message>,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

pub struct GroupCommitter {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GroupCommitter {
    pub fn start(store: Arc<Store>, max_messages: usize, max_bytes: usize) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let thread = std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || run(store, rx, max_messages, max_bytes))
            .expect("spawn spool commit thread");
        GroupCommitter { tx: Some(tx), thread: Some(thread) }
    }

    pub async fn submit(&self, batch: Vec<Message>) -> Result<(), SpoolError> {
        let (done, answer) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or(SpoolError::Closed)?;
        tx.send(Request { batch, done }).await.map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }
}

impl Drop for GroupCommitter {
    /// Finishes the commits already submitted, then lets the database close, so the spool
    /// directory can be opened again as soon as the `LocalSpool` is gone.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(store: Arc<Store>, mut rx: mpsc::Receiver<Request>, max_messages: usize, max_bytes: usize) {
    let mut pending: Vec<Request> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let (mut messages, mut bytes) = (first.batch.len(), size_of(&first.batch));
        pending.push(first);
        while messages < max_messages && bytes < max_bytes {
            match rx.try_recv() {
                Ok(req) => {
                    messages += req.batch.len();
                    bytes += size_of(&req.batch);
                    pending.push(req);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mut result = Ok(());
        let mut written = Vec::with_capacity(pending.len());
        // Each request is written on its own so one bad request cannot fail the others;
        // the fsync below covers them all.
        for req in pending.drain(..) {
            match store.insert_batch(&req.batch) {
                Ok(()) => written.push(req.done),
                Err(e) => {
                    let _ = req.done.send(Err(e));
                }
            }
        }
        if !written.is_empty() {
            result = store.sync();
        }
        metrics::histogram!("sluice_spool_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("sluice_spool_commit_messages").record(messages as f64);
        for done in written {
            let _ = done.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(SpoolError::Storage(e.to_string())),
            });
        }
    }
}

fn size_of(batch: &[Message]) -> usize {
    batch.iter().map(|m| m.body.len() + 256).sum()
}
