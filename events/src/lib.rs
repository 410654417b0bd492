//! The event log: one JSON object per line for every thing that happens to a recipient,
//! with SendGrid's Event Webhook field names, so tools written for SendGrid's webhook can
//! read it (`processed`, `dropped`, `delivered`, `deferred`, `bounce`).
//!
//! Writers call [`EventLog::emit`]; a background task appends to the file and flushes
//! whenever the queue of pending events runs empty. Events are an audit trail, not the
//! source of truth: the spool is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sluice_spool::{MessageMeta, Recipient};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Processed,
    Dropped,
    Delivered,
    Deferred,
    Bounce,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Processed => "processed",
            EventKind::Dropped => "dropped",
            EventKind::Delivered => "delivered",
            EventKind::Deferred => "deferred",
            EventKind::Bounce => "bounce",
        }
    }
}

/// One event about one recipient of one message.
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: EventKind,
    pub email: String,
    pub timestamp: u64,
    pub sg_message_id: String,
    pub smtp_id: String,
    pub categories: Vec<String>,
    pub custom_args: BTreeMap<String, String>,
    /// Every other field (`reason`, `status`, `response`, `attempt`, `type`, `tls`, `ip`,
    /// `bounce_classification`, `sluice_rule`, ...).
    pub fields: Map<String, Value>,
}

impl Event {
    /// An event about `rcpt` of the message described by `meta`, with the common fields set.
    pub fn new(kind: EventKind, meta: &MessageMeta, rcpt: &Recipient) -> Self {
        Event::for_address(kind, meta, &rcpt.address)
    }

    pub fn for_address(kind: EventKind, meta: &MessageMeta, email: &str) -> Self {
        Event {
            kind,
            email: email.to_string(),
            timestamp: sluice_spool::now_ms() / 1000,
            // SendGrid's sg_message_id starts with the X-Message-Id the client saw.
            sg_message_id: format!("{}.{}", meta.x_message_id, meta.id),
            smtp_id: meta.smtp_id.clone(),
            categories: meta.categories.clone(),
            custom_args: meta.custom_args.clone(),
            fields: Map::new(),
        }
    }

    /// Sets an extra field (builder style).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    /// The JSON object as SendGrid's webhook would post it: custom args merged at the top
    /// level, where the reserved fields win over a custom arg of the same name.
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        for (k, v) in &self.custom_args {
            o.insert(k.clone(), Value::String(v.clone()));
        }
        for (k, v) in &self.fields {
            o.insert(k.clone(), v.clone());
        }
        o.insert("email".into(), self.email.clone().into());
        o.insert("timestamp".into(), self.timestamp.into());
        o.insert("event".into(), self.kind.as_str().into());
        o.insert("sg_event_id".into(), ulid::Ulid::new().to_string().into());
        o.insert("sg_message_id".into(), self.sg_message_id.clone().into());
        if !self.smtp_id.is_empty() {
            o.insert("smtp-id".into(), self.smtp_id.clone().into());
        }
        if !self.categories.is_empty() {
            o.insert("category".into(), self.categories.clone().into());
        }
        Value::Object(o)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("cannot open event log {path}: {source} (check the directory exists and is writable)")]
    Open { path: PathBuf, source: std::io::Error },
}

/// A handle to the event log; cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    tx: Option<mpsc::Sender<Event>>,
}

impl EventLog {
    /// Appends to the file at `path`, creating it if needed. Must be called inside a tokio
    /// runtime (the writer is a task).
    pub async fn open(path: &Path) -> Result<Self, EventLogError> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|source| EventLogError::Open { path: path.to_path_buf(), source })?;
        let (tx, rx) = mpsc::channel(65_536);
        tokio::spawn(write_events(file, rx, path.to_path_buf()));
        Ok(EventLog { tx: Some(tx) })
    }

    /// A log that discards everything (tools and tests that do not need events).
    pub fn disabled() -> Self {
        EventLog { tx: None }
    }

    /// Queues an event for writing. Waits only when the writer is far behind.
    pub async fn emit(&self, event: Event) {
        metrics::counter!("sluice_events_total", "event" => event.kind.as_str()).increment(1);
        if let Some(tx) = &self.tx {
            if tx.send(event).await.is_err() {
                tracing::warn!("event log writer stopped; event not written");
            }
        }
    }
}

async fn write_events(file: tokio::fs::File, mut rx: mpsc::Receiver<Event>, path: PathBuf) {
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    let mut line = Vec::with_capacity(1024);
    while let Some(ev) = rx.recv().await {
        let mut next = Some(ev);
        while let Some(ev) = next {
            line.clear();
            serde_json::to_writer(&mut line, &ev.to_json()).expect("events serialize");
            line.push(b'\n');
            if let Err(e) = out.write_all(&line).await {
                tracing::error!(path = %path.display(), error = %e, "event log write failed");
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush().await {
            tracing::error!(path = %path.display(), error = %e, "event log flush failed");
        }
    }
    let _ = out.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_spool::{MessageId, RecipientState};

    fn meta() -> MessageMeta {
        MessageMeta {
            id: MessageId::new(),
            queue: "example.com".into(),
            tenant: "t".into(),
            mail_from: "s@example.org".into(),
            recipients: vec![Recipient { address: "a@example.com".into(), state: RecipientState::Pending, last_reply: None }],
            x_message_id: "XMSG".into(),
            smtp_id: "<m1@example.org>".into(),
            categories: vec!["news".into()],
            custom_args: [("campaign".to_string(), "c7".to_string()), ("event".to_string(), "spoof".to_string())].into(),
            ip_pool: None,
            created_at: 0,
            due_at: 0,
            expires_at: 0,
            attempts: 0,
            last_reply: None,
            prepend_headers: None,
        }
    }

    #[test]
    fn json_uses_sendgrid_names_and_reserved_fields_win() {
        let m = meta();
        let ev = Event::new(EventKind::Bounce, &m, &m.recipients[0])
            .with("status", "5.1.1")
            .with("reason", "550 5.1.1 user unknown")
            .with("type", "bounce");
        let j = ev.to_json();
        assert_eq!(j["event"], "bounce");
        assert_eq!(j["email"], "a@example.com");
        assert_eq!(j["smtp-id"], "<m1@example.org>");
        assert_eq!(j["category"], serde_json::json!(["news"]));
        assert_eq!(j["campaign"], "c7");
        assert_eq!(j["status"], "5.1.1");
        assert!(j["sg_message_id"].as_str().unwrap().starts_with("XMSG."));
        assert!(j["sg_event_id"].as_str().unwrap().len() >= 20);
        assert!(j["timestamp"].as_u64().unwrap() > 1_600_000_000);
    }

    #[tokio::test]
    async fn events_are_appended_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path).await.unwrap();
        let m = meta();
        for kind in [EventKind::Processed, EventKind::Delivered] {
            log.emit(Event::new(kind, &m, &m.recipients[0])).await;
        }
        drop(log);
        let mut lines = Vec::new();
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            lines = std::fs::read_to_string(&path).unwrap().lines().map(String::from).collect();
            if lines.len() == 2 {
                break;
            }
        }
        let kinds: Vec<String> = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(kinds, ["processed", "delivered"]);
    }
}
