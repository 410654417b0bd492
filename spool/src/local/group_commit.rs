//! Group commit: one fsync for every enqueue that arrives while the previous one runs.
//!
//! Callers hand their batch to a dedicated thread and await its answer. The thread takes
//! whatever is waiting (up to a size limit), writes it all, fsyncs once and answers every
//! caller. There is no timer: under light load each enqueue gets its own fsync at once;
//! under heavy load batches grow by themselves while the disk is busy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::{Message, SpoolError};

/// Where the committer writes: the spool's store (and, in the tests below, a stand-in whose
/// fsync can be held open).
pub(crate) trait CommitTarget: Send + Sync + 'static {
    /// Writes a batch without making it durable.
    fn insert_batch(&self, batch: &[Message]) -> Result<(), SpoolError>;
    /// Makes everything written so far durable.
    fn sync(&self) -> Result<(), SpoolError>;
}

/// What the committer has done since the spool was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Group commits, each ending in one fsync.
    pub commits: u64,
    /// Messages made durable by them.
    pub messages: u64,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    messages: AtomicU64,
}

struct Request {
    batch: Vec<Message>,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

pub struct GroupCommitter {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl GroupCommitter {
    pub(crate) fn start<T: CommitTarget>(target: Arc<T>, max_messages: usize, max_bytes: usize) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let counters = Arc::new(Counters::default());
        let thread = std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn({
                let counters = counters.clone();
                move || run(&*target, rx, max_messages, max_bytes, &counters)
            })
            .expect("spawn spool commit thread");
        GroupCommitter { tx: Some(tx), thread: Some(thread), counters }
    }

    pub fn stats(&self) -> CommitStats {
        CommitStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            messages: self.counters.messages.load(Ordering::Relaxed),
        }
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

fn run<T: CommitTarget>(
    store: &T,
    mut rx: mpsc::Receiver<Request>,
    max_messages: usize,
    max_bytes: usize,
    counters: &Counters,
) {
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
        let mut written_messages = 0;
        // Each request is written on its own so one bad request cannot fail the others;
        // the fsync below covers them all.
        for req in pending.drain(..) {
            match store.insert_batch(&req.batch) {
                Ok(()) => {
                    written_messages += req.batch.len() as u64;
                    written.push(req.done);
                }
                Err(e) => {
                    let _ = req.done.send(Err(e));
                }
            }
        }
        if !written.is_empty() {
            result = store.sync();
            counters.commits.fetch_add(1, Ordering::Relaxed);
            if result.is_ok() {
                counters.messages.fetch_add(written_messages, Ordering::Relaxed);
            }
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::{now_ms, MessageId, MessageMeta, Recipient};

    /// A stand-in for the disk (not a spool backend): it remembers what was written and what
    /// was synced, and can hold an fsync open until the test lets it finish, which a real
    /// disk cannot be made to do on cue.
    #[derive(Default)]
    struct HeldDisk {
        state: Mutex<Disk>,
        changed: Condvar,
    }

    #[derive(Default)]
    struct Disk {
        written: Vec<MessageId>,
        durable: HashSet<MessageId>,
        syncs_started: u64,
        hold: bool,
    }

    impl CommitTarget for HeldDisk {
        fn insert_batch(&self, batch: &[Message]) -> Result<(), SpoolError> {
            self.state.lock().unwrap().written.extend(batch.iter().map(|m| m.meta.id));
            Ok(())
        }
        fn sync(&self) -> Result<(), SpoolError> {
            let mut disk = self.state.lock().unwrap();
            disk.syncs_started += 1;
            self.changed.notify_all();
            while disk.hold {
                disk = self.changed.wait(disk).unwrap();
            }
            let written = std::mem::take(&mut disk.written);
            disk.durable.extend(written);
            Ok(())
        }
    }

    impl HeldDisk {
        fn wait_for_syncs(&self, n: u64) {
            let disk = self.state.lock().unwrap();
            let (_disk, timeout) =
                self.changed.wait_timeout_while(disk, Duration::from_secs(60), |d| d.syncs_started < n).unwrap();
            assert!(!timeout.timed_out(), "sync {n} never started");
        }
        fn release(&self) {
            self.state.lock().unwrap().hold = false;
            self.changed.notify_all();
        }
    }

    fn message() -> Message {
        let id = MessageId::new();
        let now = now_ms();
        Message {
            meta: MessageMeta {
                id,
                queue: "example.com".into(),
                tenant: "test".into(),
                mail_from: "a@example.org".into(),
                recipients: vec![Recipient::pending("b@example.com")],
                x_message_id: id.to_string(),
                smtp_id: format!("<{id}@test>"),
                categories: Vec::new(),
                custom_args: Default::default(),
                ip_pool: None,
                created_at: now,
                due_at: now,
                expires_at: now + 3_600_000,
                attempts: 0,
                last_reply: None,
                prepend_headers: None,
            },
            body: Bytes::from_static(b"Subject: x\r\n\r\nx\r\n"),
        }
    }

    /// While one fsync runs, every enqueue that arrives waits, and then all of them share the
    /// next fsync; no caller hears back before the fsync covering its batch has returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enqueues_arriving_during_an_fsync_share_the_next_one() {
        let disk = Arc::new(HeldDisk::default());
        disk.state.lock().unwrap().hold = true;
        let committer = Arc::new(GroupCommitter::start(disk.clone(), 2048, 64 << 20));
        let answered = Arc::new(AtomicU64::new(0));
        let enqueue = |batch: Vec<Message>| {
            let (committer, disk, answered) = (committer.clone(), disk.clone(), answered.clone());
            tokio::spawn(async move {
                let ids: Vec<MessageId> = batch.iter().map(|m| m.meta.id).collect();
                committer.submit(batch).await.unwrap();
                let durable = &disk.state.lock().unwrap().durable;
                assert!(ids.iter().all(|id| durable.contains(id)), "answered before its batch was synced");
                answered.fetch_add(1, Ordering::SeqCst);
            })
        };

        // The first enqueue starts a commit, whose fsync the disk holds.
        let first = enqueue(vec![message()]);
        let held = disk.clone();
        tokio::task::spawn_blocking(move || held.wait_for_syncs(1)).await.unwrap();
        // 50 more (one to three messages each) arrive while it is held.
        let callers: Vec<_> = (0..50).map(|i| enqueue((0..1 + i % 3).map(|_| message()).collect())).collect();
        let queued = || {
            let tx = committer.tx.as_ref().unwrap();
            tx.max_capacity() - tx.capacity()
        };
        while queued() < 50 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(answered.load(Ordering::SeqCst), 0, "nobody is answered while the fsync is held");
        assert_eq!(committer.stats(), CommitStats::default());

        disk.release();
        tokio::time::timeout(Duration::from_secs(60), first).await.unwrap().unwrap();
        for caller in callers {
            tokio::time::timeout(Duration::from_secs(60), caller).await.unwrap().unwrap();
        }
        assert_eq!(answered.load(Ordering::SeqCst), 51);
        let messages = 1 + (0..50).map(|i| 1 + i % 3).sum::<u64>();
        assert_eq!(committer.stats(), CommitStats { commits: 2, messages }, "51 enqueues, 2 fsyncs");
        assert_eq!(disk.state.lock().unwrap().syncs_started, 2);
    }
}
