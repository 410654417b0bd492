//! Shared by the `http_*` tests: a router backed by a temporary LocalSpool that also
//! records what was enqueued (including messages scheduled for later, which a lease would
//! not return), spools that fail on purpose, and MIME helpers.

#![allow(dead_code)] // each test file uses a different subset

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use mail_parser::{MessageParser, MimeHeaders, PartType};
use serde_json::{json, Value};
use sluice_edge::auth::hash_key;
use sluice_edge::http::{router, HttpConfig, HttpEdge};
use sluice_edge::{ApiKeyConfig, ApiKeys, Ingest};
use sluice_events::EventLog;
use sluice_spool::{
    Lease, LeaseRequest, Leased, LocalSpool, LocalSpoolOptions, Message, MessageId, MessageMeta, Spool, SpoolCounts,
    SpoolError,
};
use tower::ServiceExt;

pub const KEY: &str = "SG.test-key.secret";
pub const TENANT: &str = "acme";
pub const HOSTNAME: &str = "edge.test";

/// A LocalSpool that remembers every message it stored.
pub struct RecordingSpool {
    inner: LocalSpool,
    pub enqueued: Mutex<Vec<Message>>,
}

#[async_trait]
impl Spool for RecordingSpool {
    async fn enqueue(&self, batch: Vec<Message>) -> Result<(), SpoolError> {
        self.inner.enqueue(batch.clone()).await?;
        self.enqueued.lock().unwrap().extend(batch);
        Ok(())
    }
    async fn lease(&self, req: LeaseRequest) -> Result<Vec<Leased>, SpoolError> {
        self.inner.lease(req).await
    }
    async fn reschedule(&self, lease: &Lease, meta: MessageMeta) -> Result<(), SpoolError> {
        self.inner.reschedule(lease, meta).await
    }
    async fn complete(&self, lease: &Lease) -> Result<(), SpoolError> {
        self.inner.complete(lease).await
    }
    async fn get(&self, id: MessageId) -> Result<Option<MessageMeta>, SpoolError> {
        self.inner.get(id).await
    }
    async fn counts(&self) -> Result<SpoolCounts, SpoolError> {
        self.inner.counts().await
    }
    fn backend(&self) -> &'static str {
        "recording-local"
    }
}

/// A spool whose enqueue always fails with the given error.
pub struct FailingSpool(pub fn() -> SpoolError);

#[async_trait]
impl Spool for FailingSpool {
    async fn enqueue(&self, _batch: Vec<Message>) -> Result<(), SpoolError> {
        Err((self.0)())
    }
    async fn lease(&self, _req: LeaseRequest) -> Result<Vec<Leased>, SpoolError> {
        Ok(Vec::new())
    }
    async fn reschedule(&self, _lease: &Lease, _meta: MessageMeta) -> Result<(), SpoolError> {
        Err((self.0)())
    }
    async fn complete(&self, _lease: &Lease) -> Result<(), SpoolError> {
        Err((self.0)())
    }
    async fn get(&self, _id: MessageId) -> Result<Option<MessageMeta>, SpoolError> {
        Ok(None)
    }
    async fn counts(&self) -> Result<SpoolCounts, SpoolError> {
        Ok(SpoolCounts::default())
    }
    fn backend(&self) -> &'static str {
        "failing"
    }
}

pub fn api_keys() -> Arc<ApiKeys> {
    Arc::new(ApiKeys::from_config(&[ApiKeyConfig { name: TENANT.into(), sha256: hash_key(KEY) }]).unwrap())
}

pub struct Harness {
    pub router: Router,
    pub edge: HttpEdge,
    pub spool: Arc<RecordingSpool>,
    _dir: tempfile::TempDir,
}

/// What came back.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// `(field, message)` of each error, in order.
    pub fn errors(&self) -> Vec<(Option<String>, String)> {
        let v = self.json();
        v["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors array in {v}"))
            .iter()
            .map(|e| (e["field"].as_str().map(str::to_string), e["message"].as_str().unwrap().to_string()))
            .collect()
    }

    /// The message of the error on `field`; panics (showing all errors) if there is none.
    pub fn error_on(&self, field: &str) -> String {
        let errors = self.errors();
        errors
            .iter()
            .find(|(f, _)| f.as_deref() == Some(field))
            .map(|(_, m)| m.clone())
            .unwrap_or_else(|| panic!("no error on {field:?}; got {errors:#?}"))
    }
}

impl Harness {
    pub fn new() -> Self {
        Self::with_config(HttpConfig::default())
    }

    pub fn with_config(config: HttpConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(RecordingSpool {
            inner: LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap(),
            enqueued: Mutex::new(Vec::new()),
        });
        let ingest = Ingest::new(spool.clone(), EventLog::disabled(), Duration::from_secs(3600));
        let edge = HttpEdge::new(config, ingest, api_keys(), HOSTNAME);
        Harness { router: router(edge.clone()), edge, spool, _dir: dir }
    }

    pub async fn send(&self, req: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes().to_vec();
        Reply { status: parts.status, headers: parts.headers, body }
    }

    /// POSTs `body` to /v3/mail/send with the valid key.
    pub async fn post(&self, body: &Value) -> Reply {
        self.post_raw(serde_json::to_vec(body).unwrap()).await
    }

    pub async fn post_raw(&self, body: Vec<u8>) -> Reply {
        self.send(mail_send_request(Some(KEY), body)).await
    }

    pub fn enqueued(&self) -> Vec<Message> {
        self.spool.enqueued.lock().unwrap().clone()
    }
}

/// A POST /v3/mail/send request as the SDKs send it.
pub fn mail_send_request(key: Option<&str>, body: Vec<u8>) -> Request<Body> {
    let mut req = Request::post("/v3/mail/send").header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    req.body(Body::from(body)).unwrap()
}

/// The smallest valid request.
pub fn minimal() -> Value {
    json!({
        "personalizations": [{"to": [{"email": "rcpt@example.com"}]}],
        "from": {"email": "sender@example.org"},
        "subject": "Hello",
        "content": [{"type": "text/plain", "value": "Hi there"}]
    })
}

/// The MIME tree of a message: `multipart/mixed[text/plain,image/png]`.
pub fn structure(raw: &[u8]) -> String {
    let msg = MessageParser::default().parse(raw).expect("spooled body parses as MIME");
    fn walk(msg: &mail_parser::Message<'_>, id: u32, out: &mut String) {
        let part = msg.part(id).unwrap();
        let ct = part.content_type().map_or("text/plain".to_string(), |c| {
            format!("{}/{}", c.ctype(), c.subtype().unwrap_or(""))
        });
        out.push_str(&ct);
        if let PartType::Multipart(children) = &part.body {
            out.push('[');
            for (i, child) in children.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                walk(msg, *child, out);
            }
            out.push(']');
        }
    }
    let mut out = String::new();
    walk(&msg, 0, &mut out);
    out
}

/// The raw header section (up to the first empty line).
pub fn header_section(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.split("\r\n\r\n").next().unwrap().to_string()
}
