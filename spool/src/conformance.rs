//! The conformance suite every [`Spool`] backend must pass.
//!
//! Each case takes a freshly created, empty spool. Use [`spool_conformance_tests!`] to turn
//! every case into its own `#[tokio::test]`:
//!
//! ```ignore
//! sluice_spool::spool_conformance_tests!(async { my_backend().await });
//! ```

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{now_ms, LeaseRequest, Message, MessageId, MessageMeta, Recipient, RecipientState, Spool, SpoolError};

/// A small valid message to `queue`, due now.
pub fn message(queue: &str, rcpts: &[&str]) -> Message {
    let id = MessageId::new();
    let now = now_ms();
    Message {
        meta: MessageMeta {
            id,
            queue: queue.to_string(),
            tenant: "test".into(),
            mail_from: "sender@example.org".into(),
            recipients: rcpts.iter().map(|r| Recipient::pending(*r)).collect(),
            x_message_id: id.to_string(),
            smtp_id: format!("<{id}@test>"),
            categories: vec!["c1".into()],
            custom_args: [("k".to_string(), "v".to_string())].into(),
            ip_pool: None,
            created_at: now,
            due_at: now,
            expires_at: now + 3_600_000,
            attempts: 0,
            last_reply: None,
            prepend_headers: None,
        },
        body: Bytes::from(format!("Subject: {id}\r\nMessage-ID: <{id}@test>\r\n\r\nbody of {id}\r\n")),
    }
}

fn short(ms: u64) -> LeaseRequest {
    LeaseRequest::new(1000, Duration::from_millis(ms))
}

pub async fn enqueue_then_lease_returns_message_intact(spool: Arc<dyn Spool>) {
    let m = message("example.com", &["a@example.com", "b@example.com"]);
    spool.enqueue(vec![m.clone()]).await.unwrap();
    let got = spool.get(m.id()).await.unwrap().expect("stored");
    assert_eq!(got, m.meta);
    let leased = spool.lease(short(60_000)).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].meta, m.meta);
    assert_eq!(leased[0].body, m.body);
    assert_eq!(leased[0].lease.id, m.id());
    assert!(leased[0].lease.until >= now_ms() + 50_000);
    // leased messages are not leased again
    assert!(spool.lease(short(60_000)).await.unwrap().is_empty());
}

pub async fn only_due_messages_are_leased_oldest_first(spool: Arc<dyn Spool>) {
    let now = now_ms();
    let mut later = message("q.test", &["x@q.test"]);
    later.meta.due_at = now + 3_600_000;
    let mut m1 = message("q.test", &["1@q.test"]);
    m1.meta.due_at = now - 3000;
    let mut m2 = message("q.test", &["2@q.test"]);
    m2.meta.due_at = now - 2000;
    let mut m3 = message("q.test", &["3@q.test"]);
    m3.meta.due_at = now - 1000;
    spool.enqueue(vec![m3.clone(), later.clone(), m1.clone()]).await.unwrap();
    spool.enqueue(vec![m2.clone()]).await.unwrap();
    let leased = spool.lease(short(60_000)).await.unwrap();
    let ids: Vec<_> = leased.iter().map(|l| l.meta.id).collect();
    assert_eq!(ids, vec![m1.id(), m2.id(), m3.id()], "due order within a queue");
    let mut req = short(60_000);
    req.max = 1;
    assert!(spool.lease(req).await.unwrap().is_empty(), "the future message is not due");
}

pub async fn lease_respects_max(spool: Arc<dyn Spool>) {
    let batch: Vec<_> = (0..10).map(|i| message("max.test", &[&format!("{i}@max.test")])).collect();
    spool.enqueue(batch).await.unwrap();
    let mut req = short(60_000);
    req.max = 4;
    assert_eq!(spool.lease(req.clone()).await.unwrap().len(), 4);
    assert_eq!(spool.lease(req.clone()).await.unwrap().len(), 4);
    assert_eq!(spool.lease(req).await.unwrap().len(), 2);
}

pub async fn complete_removes_and_stale_lease_is_refused(spool: Arc<dyn Spool>) {
    let m = message("c.test", &["a@c.test"]);
    spool.enqueue(vec![m.clone()]).await.unwrap();
    let l = spool.lease(short(60_000)).await.unwrap().remove(0);
    let mut forged = l.lease.clone();
    forged.token = forged.token.wrapping_add(1);
    assert!(matches!(spool.complete(&forged).await, Err(SpoolError::LeaseLost(_))));
    spool.complete(&l.lease).await.unwrap();
    assert!(spool.get(m.id()).await.unwrap().is_none());
    assert!(matches!(spool.complete(&l.lease).await, Err(SpoolError::LeaseLost(_))));
    assert_eq!(spool.counts().await.unwrap().queued, 0);
}

pub async fn reschedule_updates_metadata_and_due_time(spool: Arc<dyn Spool>) {
    let m = message("r.test", &["a@r.test", "b@r.test"]);
    spool.enqueue(vec![m.clone()]).await.unwrap();
    let l = spool.lease(short(60_000)).await.unwrap().remove(0);
    let mut meta = l.meta.clone();
    meta.attempts = 1;
    meta.recipients[0].state = RecipientState::Delivered;
    meta.recipients[1].last_reply = Some("451 4.3.0 try later".into());
    meta.last_reply = Some("451 4.3.0 try later".into());
    meta.prepend_headers = Some("DKIM-Signature: x\r\n".into());
    meta.due_at = now_ms() + 400;
    spool.reschedule(&l.lease, meta.clone()).await.unwrap();
    assert_eq!(spool.get(m.id()).await.unwrap().unwrap(), meta);
    let c = spool.counts().await.unwrap();
    assert_eq!((c.queued, c.deferred, c.leased), (1, 1, 0));
    assert!(spool.lease(short(60_000)).await.unwrap().is_empty(), "not due yet");
    assert!(matches!(spool.reschedule(&l.lease, meta.clone()).await, Err(SpoolError::LeaseLost(_))));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = spool.lease(short(60_000)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].meta, meta);
    assert_eq!(again[0].body, m.body);
}

pub async fn expired_lease_returns_message_to_queue(spool: Arc<dyn Spool>) {
    let m = message("e.test", &["a@e.test"]);
    spool.enqueue(vec![m.clone()]).await.unwrap();
    let first = spool.lease(short(300)).await.unwrap().remove(0);
    assert_eq!(spool.counts().await.unwrap().leased, 1);
    assert!(spool.lease(short(300)).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(spool.counts().await.unwrap().leased, 0, "an expired lease is not in flight");
    let second = spool.lease(short(60_000)).await.unwrap();
    assert_eq!(second.len(), 1, "the crashed worker's message is leased again");
    assert_eq!(second[0].meta.id, m.id());
    assert_ne!(second[0].lease.token, first.lease.token);
    // the first worker woke up: it must not be able to touch the message any more
    assert!(matches!(spool.complete(&first.lease).await, Err(SpoolError::LeaseLost(_))));
    assert!(matches!(spool.reschedule(&first.lease, first.meta.clone()).await, Err(SpoolError::LeaseLost(_))));
    spool.complete(&second[0].lease).await.unwrap();
}

pub async fn counts_by_state(spool: Arc<dyn Spool>) {
    assert_eq!(spool.counts().await.unwrap(), Default::default());
    let batch: Vec<_> = (0..5).map(|i| message("n.test", &[&format!("{i}@n.test")])).collect();
    spool.enqueue(batch).await.unwrap();
    let c = spool.counts().await.unwrap();
    assert_eq!((c.queued, c.deferred, c.leased), (5, 0, 0));
    let mut req = short(60_000);
    req.max = 2;
    let leased = spool.lease(req).await.unwrap();
    let c = spool.counts().await.unwrap();
    assert_eq!((c.queued, c.deferred, c.leased), (3, 0, 2));
    spool.complete(&leased[0].lease).await.unwrap();
    let c = spool.counts().await.unwrap();
    assert_eq!((c.queued, c.deferred, c.leased), (3, 0, 1));
}

pub async fn a_big_backlog_does_not_starve_other_queues(spool: Arc<dyn Spool>) {
    let now = now_ms();
    let backlog: Vec<_> = (0..300)
        .map(|i| {
            let mut m = message("big.test", &[&format!("{i}@big.test")]);
            m.meta.due_at = now - 10_000; // older than everything else
            m
        })
        .collect();
    spool.enqueue(backlog).await.unwrap();
    let small = message("small.test", &["a@small.test"]);
    spool.enqueue(vec![small.clone()]).await.unwrap();
    let mut req = short(60_000);
    req.max = 20;
    req.max_per_queue = 10;
    let got = spool.lease(req.clone()).await.unwrap();
    assert!(got.iter().any(|l| l.meta.queue == "small.test"), "small queue served despite the backlog");
    assert!(got.iter().filter(|l| l.meta.queue == "big.test").count() <= 10);
    // a filter excludes a throttled queue entirely
    let mut req = short(60_000);
    req.filter = Some(Arc::new(|q: &str| q != "big.test"));
    assert!(spool.lease(req).await.unwrap().is_empty(), "only the filtered-out queue has due mail");
    let more = message("small.test", &["b@small.test"]);
    spool.enqueue(vec![more.clone()]).await.unwrap();
    let mut req = short(60_000);
    req.filter = Some(Arc::new(|q: &str| q != "big.test"));
    let got = spool.lease(req).await.unwrap();
    assert_eq!(got.iter().map(|l| l.meta.id).collect::<Vec<_>>(), vec![more.id()]);
}

pub async fn concurrent_enqueues_and_leases_lose_and_duplicate_nothing(spool: Arc<dyn Spool>) {
    let mut tasks = Vec::new();
    for t in 0..16 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..25 {
                let m = message(&format!("d{}.test", t % 4), &[&format!("{t}-{i}@x.test")]);
                ids.push(m.id());
                spool.enqueue(vec![m]).await.unwrap();
            }
            ids
        }));
    }
    let mut expected = HashSet::new();
    for t in tasks {
        expected.extend(t.await.unwrap());
    }
    let mut workers = Vec::new();
    for _ in 0..4 {
        let spool = spool.clone();
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let mut req = short(60_000);
                req.max = 7;
                let got = spool.lease(req).await.unwrap();
                if got.is_empty() {
                    break;
                }
                for l in got {
                    seen.push(l.meta.id);
                    spool.complete(&l.lease).await.unwrap();
                }
            }
            seen
        }));
    }
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.unwrap());
    }
    let unique: HashSet<_> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "a message was leased twice");
    assert_eq!(unique, expected);
    assert_eq!(spool.counts().await.unwrap(), Default::default());
}

pub async fn empty_enqueue_is_a_no_op(spool: Arc<dyn Spool>) {
    spool.enqueue(Vec::new()).await.unwrap();
    assert_eq!(spool.counts().await.unwrap().queued, 0);
}

/// Generates one `#[tokio::test]` per conformance case. `$make` is an expression evaluating to
/// a future of `Arc<dyn Spool>` (a fresh, empty spool); it is evaluated once per case.
#[macro_export]
macro_rules! spool_conformance_tests {
    ($make:expr) => {
        $crate::spool_conformance_tests!(@cases $make;
            enqueue_then_lease_returns_message_intact,
            only_due_messages_are_leased_oldest_first,
            lease_respects_max,
            complete_removes_and_stale_lease_is_refused,
            reschedule_updates_metadata_and_due_time,
            expired_lease_returns_message_to_queue,
            counts_by_state,
            a_big_backlog_does_not_starve_other_queues,
            concurrent_enqueues_and_leases_lose_and_duplicate_nothing,
            empty_enqueue_is_a_no_op,
        );
    };
    (@cases $make:expr; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let spool: ::std::sync::Arc<dyn $crate::Spool> = $make.await;
                $crate::conformance::$case(spool).await;
            }
        )*
    };
}
