//! The common path of both edges: turn an accepted submission into spool messages, make
//! them durable, then write `processed` events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use sluice_events::{Event, EventKind, EventLog};
use sluice_spool::{now_ms, Message, MessageId, MessageMeta, Recipient, Spool, SpoolError, SuppressionList};

/// One message as a client submitted it: an envelope and a complete RFC 5322 body.
#[derive(Clone, Debug, Default)]
pub struct Submission {
    pub tenant: String,
    /// MAIL FROM (empty for the null reverse-path).
    pub mail_from: String,
    /// RCPT TO addresses; every one contains an `@`.
    pub recipients: Vec<String>,
    /// The message with CRLF line endings, headers included.
    pub body: Bytes,
    /// The Message-ID header value, `<...>`.
    pub smtp_id: String,
    pub categories: Vec<String>,
    pub custom_args: BTreeMap<String, String>,
    pub ip_pool: Option<String>,
    /// Do not deliver before this time (unix seconds).
    pub send_at: Option<u64>,
}

/// The domain part of an address, lower-cased: the spool queue it goes to.
pub fn recipient_domain(address: &str) -> Option<String> {
    let (_, domain) = address.rsplit_once('@')?;
    let d = domain.trim_end_matches('>').trim().trim_end_matches('.').to_ascii_lowercase();
    (!d.is_empty()).then_some(d)
}

/// Why a submission is refused before anything is stored (e.g. DKIM policy: this tenant
/// may not send mail that no key can sign).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The request field at fault, for the HTTP API's error (`from.email`).
    pub field: String,
    /// What happened and what to do, for the client.
    pub message: String,
}

/// A check every submission must pass before it is accepted. The binary builds it from
/// configuration the edge itself knows nothing about (the DKIM policy lives in the MTA crate).
pub type AdmissionCheck = Arc<dyn Fn(&Submission) -> Result<(), Refusal> + Send + Sync>;

/// Writes submissions into the spool. Shared by the HTTP and SMTP edges.
#[derive(Clone)]
pub struct Ingest {
    spool: Arc<dyn Spool>,
    events: EventLog,
    /// How long the MTA keeps retrying before it gives up (sets each message's expiry).
    max_age: Duration,
    /// Woken after each accepted batch, so idle delivery workers in this process start at once.
    waker: Option<Arc<Notify>>,
    /// Recipients that hard-bounced before: dropped instead of spooled.
    suppressions: Option<Arc<dyn SuppressionList>>,
    admission: Option<AdmissionCheck>,
}

/// The `reason` of the `dropped` event for a suppressed recipient (SendGrid's wording).
pub const BOUNCED_ADDRESS: &str = "Bounced Address";

impl Ingest {
    pub fn new(spool: Arc<dyn Spool>, events: EventLog, max_age: Duration) -> Self {
        Ingest { spool, events, max_age, waker: None, suppressions: None, admission: None }
    }

    /// Every submission must pass `check` ([`Ingest::admit`]); the edges answer a refusal
    /// with HTTP 400 or SMTP 550 5.7.1 and store nothing.
    pub fn with_admission(mut self, check: AdmissionCheck) -> Self {
        self.admission = Some(check);
        self
    }

    /// Whether `sub` may be accepted. Both edges call it for every submission of a request
    /// before [`Ingest::accept`], so a refused request stores nothing.
    pub fn admit(&self, sub: &Submission) -> Result<(), Refusal> {
        match &self.admission {
            Some(check) => check(sub),
            None => Ok(()),
        }
    }

    /// Notifies `waker` whenever mail was accepted (the MTA of the same process listens).
    pub fn with_waker(mut self, waker: Arc<Notify>) -> Self {
        self.waker = Some(waker);
        self
    }

    /// Drops recipients on `list` (for the submission's tenant) with a `dropped` event
    /// instead of spooling them.
    pub fn with_suppressions(mut self, list: Arc<dyn SuppressionList>) -> Self {
        self.suppressions = Some(list);
        self
    }

    /// Takes the suppressed recipients out of `batch` (and messages left without any) and
    /// returns them with the message they belonged to, for their `dropped` events.
    async fn drop_suppressed(&self, batch: &mut Vec<Message>) -> Result<Vec<(MessageMeta, Vec<String>)>, SpoolError> {
        let Some(list) = &self.suppressions else { return Ok(Vec::new()) };
        // One lookup per tenant for the whole request.
        let mut by_tenant: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
        for (i, m) in batch.iter().enumerate() {
            for r in &m.meta.recipients {
                by_tenant.entry(m.meta.tenant.clone()).or_default().push((i, r.address.clone()));
            }
        }
        let mut suppressed: Vec<Vec<String>> = vec![Vec::new(); batch.len()];
        for (tenant, entries) in by_tenant {
            let addresses: Vec<String> = entries.iter().map(|(_, a)| a.clone()).collect();
            let flags = list.check(&tenant, &addresses).await?;
            for ((i, address), hit) in entries.into_iter().zip(flags) {
                if hit {
                    suppressed[i].push(address);
                }
            }
        }
        let mut dropped = Vec::new();
        let mut kept = Vec::with_capacity(batch.len());
        for (mut m, gone) in batch.drain(..).zip(suppressed) {
            if gone.is_empty() {
                kept.push(m);
                continue;
            }
            let meta = m.meta.clone();
            m.meta.recipients.retain(|r| !gone.contains(&r.address));
            if !m.meta.recipients.is_empty() {
                kept.push(m);
            }
            dropped.push((meta, gone));
        }
        *batch = kept;
        Ok(dropped)
    }

    /// Splits each submission into one spool message per recipient domain (so each is
    /// delivered over one connection and paced per destination), enqueues them all in one
    /// durable batch and writes a `processed` event per recipient. Returns the spool ids.
    ///
    /// Recipients on the suppression list are not spooled: they get a `dropped` event
    /// ("Bounced Address"), and a submission whose recipients are all suppressed is still
    /// accepted (as SendGrid does).
    ///
    /// When this returns `Ok`, every message is durable and the client may be answered.
    pub async fn accept(&self, x_message_id: &str, subs: Vec<Submission>) -> Result<Vec<MessageId>, SpoolError> {
        let now = now_ms();
        let mut batch = Vec::new();
        for sub in subs {
            let mut by_domain: BTreeMap<String, Vec<Recipient>> = BTreeMap::new();
            for r in &sub.recipients {
                let Some(domain) = recipient_domain(r) else { continue };
                by_domain.entry(domain).or_default().push(Recipient::pending(r.clone()));
            }
            let due = sub.send_at.map(|s| s.saturating_mul(1000)).unwrap_or(now).max(now);
            for (queue, recipients) in by_domain {
                let id = MessageId::new();
                batch.push(Message {
                    meta: MessageMeta {
                        id,
                        queue,
                        tenant: sub.tenant.clone(),
                        mail_from: sub.mail_from.clone(),
                        recipients,
                        x_message_id: x_message_id.to_string(),
                        smtp_id: sub.smtp_id.clone(),
                        categories: sub.categories.clone(),
                        custom_args: sub.custom_args.clone(),
                        ip_pool: sub.ip_pool.clone(),
                        created_at: now,
                        due_at: due,
                        expires_at: due + self.max_age.as_millis() as u64,
                        attempts: 0,
                        last_reply: None,
                        prepend_headers: None,
                    },
                    body: sub.body.clone(),
                });
            }
        }
        let dropped = self.drop_suppressed(&mut batch).await?;
        let ids: Vec<MessageId> = batch.iter().map(|m| m.id()).collect();
        let metas: Vec<MessageMeta> = batch.iter().map(|m| m.meta.clone()).collect();
        self.spool.enqueue(batch).await?;
        for (meta, addresses) in &dropped {
            metrics::counter!("sluice_dropped_total", "reason" => "bounced_address").increment(addresses.len() as u64);
            for a in addresses {
                self.events.emit(Event::for_address(EventKind::Dropped, meta, a).with("reason", BOUNCED_ADDRESS)).await;
            }
        }
        metrics::counter!("sluice_received_messages_total").increment(ids.len() as u64);
        if let Some(w) = &self.waker {
            w.notify_one();
        }
        for meta in &metas {
            for r in &meta.recipients {
                self.events.emit(Event::new(EventKind::Processed, meta, r)).await;
            }
        }
        Ok(ids)
    }

    pub fn spool(&self) -> &Arc<dyn Spool> {
        &self.spool
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_spool::{LeaseRequest, LocalSpool, LocalSpoolOptions};

    #[tokio::test]
    async fn splits_by_domain_and_enqueues_durably() {
        let dir = tempfile::tempdir().unwrap();
        let spool: Arc<dyn Spool> = Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap());
        let ingest = Ingest::new(spool.clone(), EventLog::disabled(), Duration::from_secs(3600));
        let sub = Submission {
            tenant: "t".into(),
            mail_from: "s@example.org".into(),
            recipients: vec!["a@Gmail.com".into(), "b@gmail.com".into(), "c@yahoo.com".into()],
            body: Bytes::from_static(b"Subject: x\r\n\r\nhi\r\n"),
            smtp_id: "<x@y>".into(),
            ..Default::default()
        };
        let ids = ingest.accept("XID", vec![sub]).await.unwrap();
        assert_eq!(ids.len(), 2);
        let mut leased = spool.lease(LeaseRequest::new(10, Duration::from_secs(60))).await.unwrap();
        leased.sort_by(|a, b| a.meta.queue.cmp(&b.meta.queue));
        assert_eq!(leased[0].meta.queue, "gmail.com");
        assert_eq!(leased[0].meta.recipients.len(), 2);
        assert_eq!(leased[1].meta.queue, "yahoo.com");
        assert_eq!(leased[1].meta.x_message_id, "XID");
    }

    #[tokio::test]
    async fn suppressed_recipients_are_dropped_not_spooled() {
        use sluice_spool::{Suppression, SuppressionList};
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap());
        local.suppress(vec![Suppression::new("t", "Gone@Gmail.com", "550 5.1.1 no such user", "r")]).await.unwrap();
        local.suppress(vec![Suppression::new("t", "gone@yahoo.com", "550 5.1.1 no such user", "r")]).await.unwrap();
        let spool: Arc<dyn Spool> = local.clone();
        let path = dir.path().join("events.jsonl");
        let events = EventLog::open(&path).await.unwrap();
        let ingest = Ingest::new(spool.clone(), events, Duration::from_secs(3600)).with_suppressions(local.clone());
        let sub = |rcpts: &[&str], tenant: &str| Submission {
            tenant: tenant.into(),
            mail_from: "s@example.org".into(),
            recipients: rcpts.iter().map(|r| r.to_string()).collect(),
            body: Bytes::from_static(b"Subject: x\r\n\r\nhi\r\n"),
            ..Default::default()
        };
        // gmail keeps one recipient; yahoo has none left, so it is not spooled at all
        let ids = ingest.accept("XID", vec![sub(&["gone@gmail.com", "ok@gmail.com", "GONE@yahoo.com"], "t")]).await.unwrap();
        assert_eq!(ids.len(), 1);
        let leased = spool.lease(LeaseRequest::new(10, Duration::from_secs(60))).await.unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].meta.recipients.iter().map(|r| r.address.as_str()).collect::<Vec<_>>(), ["ok@gmail.com"]);
        // every recipient suppressed: accepted, nothing spooled; another tenant is unaffected
        assert!(ingest.accept("XID2", vec![sub(&["gone@gmail.com"], "t")]).await.unwrap().is_empty());
        assert_eq!(ingest.accept("XID3", vec![sub(&["gone@gmail.com"], "other")]).await.unwrap().len(), 1);
        let mut dropped = Vec::new();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            dropped = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|e| e["event"] == "dropped")
                .collect();
            if dropped.len() == 3 {
                break;
            }
        }
        assert_eq!(dropped.len(), 3, "{dropped:?}");
        assert!(dropped.iter().all(|e| e["reason"] == BOUNCED_ADDRESS));
        let mut emails: Vec<&str> = dropped.iter().map(|e| e["email"].as_str().unwrap()).collect();
        emails.sort();
        assert_eq!(emails, ["GONE@yahoo.com", "gone@gmail.com", "gone@gmail.com"]);
    }

    #[test]
    fn admission_checks_are_optional_and_see_each_submission() {
        let dir = tempfile::tempdir().unwrap();
        let spool: Arc<dyn Spool> = Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap());
        let ingest = Ingest::new(spool, EventLog::disabled(), Duration::from_secs(60));
        let sub = Submission { tenant: "apikey:strict".into(), ..Default::default() };
        assert_eq!(ingest.admit(&sub), Ok(()));
        let refusal = Refusal { field: "from.email".into(), message: "no".into() };
        let expected = refusal.clone();
        let ingest = ingest.with_admission(Arc::new(move |s: &Submission| {
            if s.tenant == "apikey:strict" {
                Err(refusal.clone())
            } else {
                Ok(())
            }
        }));
        assert_eq!(ingest.admit(&sub), Err(expected));
        assert_eq!(ingest.admit(&Submission { tenant: "apikey:other".into(), ..Default::default() }), Ok(()));
    }

    #[test]
    fn domains_are_lower_cased() {
        assert_eq!(recipient_domain("A@Example.COM").as_deref(), Some("example.com"));
        assert_eq!(recipient_domain("nodomain"), None);
        assert_eq!(recipient_domain("a@"), None);
    }
}
