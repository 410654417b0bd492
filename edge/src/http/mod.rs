//! The SendGrid v3 compatible HTTP API (`POST /v3/mail/send`).
//!
//! The official SendGrid SDKs work against it by changing only their base URL. A request is
//! authenticated with `Authorization: Bearer <API key>`, checked against SendGrid's rules
//! (all violations reported at once, in SendGrid's error shape), turned into one RFC 5322
//! message per personalization, and handed to [`Ingest::accept`] in one call. The client
//! gets `202` with an `X-Message-Id` only once every message is durable in the spool;
//! on a spool failure nothing is acknowledged.
//!
//! Also served: `GET /healthz` (`200 ok`). Other paths get SendGrid-shaped 404s, other
//! methods 405s.

mod address;
mod config;
mod error;
mod mail_send;
mod mime;
mod request;
mod server;
mod substitute;
mod validate;

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::{ApiKeys, Ingest};

pub use config::HttpConfig;
pub use error::{FieldError, UNAUTHORIZED_MESSAGE};
pub use server::serve;

/// Everything a request needs: built once by the binary, cloned cheaply per request.
#[derive(Clone)]
pub struct HttpEdge {
    inner: Arc<Inner>,
}

struct Inner {
    config: HttpConfig,
    ingest: Ingest,
    keys: Arc<ApiKeys>,
    /// The right-hand side of generated Message-IDs (`<ULID@hostname>`).
    hostname: String,
}

impl HttpEdge {
    pub fn new(config: HttpConfig, ingest: Ingest, keys: Arc<ApiKeys>, hostname: impl Into<String>) -> Self {
        HttpEdge { inner: Arc::new(Inner { config, ingest, keys, hostname: hostname.into() }) }
    }

    pub fn config(&self) -> &HttpConfig {
        &self.inner.config
    }
}

/// The API's routes, for [`serve`] or for driving directly in tests (`tower::ServiceExt`).
pub fn router(edge: HttpEdge) -> Router {
    Router::new()
        .route("/v3/mail/send", post(mail_send::mail_send).fallback(|| async { method_not_allowed("POST") }))
        .route("/healthz", get(|| async { "ok" }).fallback(|| async { method_not_allowed("GET, HEAD") }))
        .fallback(|| async { not_found() })
        .with_state(edge)
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut response = error::ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed: this path accepts {allow}"),
    )
    .into_response();
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn not_found() -> Response {
    error::ApiError::new(
        StatusCode::NOT_FOUND,
        "not found: sluice serves POST /v3/mail/send (if your client's base URL ends with a slash, remove it)",
    )
    .into_response()
}
