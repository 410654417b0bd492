//! `POST /v3/mail/send`: authenticate, read and check the body, build one message per
//! personalization, store them all durably, and only then answer 202 with `X-Message-Id`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use sluice_spool::SpoolError;
use tokio::time::timeout_at;

use super::error::{ApiError, FieldError};
use super::mime::build_message;
use super::validate::plan;
use super::{request, HttpEdge};
use crate::Submission;

/// Bodies up to this size are checked and built on the reactor thread; larger ones (big
/// attachments to decode and re-encode, many personalizations) on the blocking pool.
const INLINE_WORK_MAX_BYTES: usize = 64 * 1024;

/// Never reserve more than this up front from a client's Content-Length: a client that
/// announces 30 MB and sends nothing must not cost 30 MB.
const MAX_PREALLOCATION: usize = 1024 * 1024;

pub(super) async fn mail_send(State(edge): State<HttpEdge>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let response = match edge.mail_send(&headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    metrics::counter!("sluice_http_requests_total", "status" => response.status().as_str().to_owned()).increment(1);
    metrics::histogram!("sluice_http_request_duration_seconds").record(started.elapsed().as_secs_f64());
    response
}

/// What a checked request turns into.
struct Prepared {
    sandbox: bool,
    submissions: Vec<Submission>,
}

impl HttpEdge {
    async fn mail_send(&self, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
        let config = &self.inner.config;
        let deadline = tokio::time::Instant::now() + config.request_timeout;

        // SendGrid checks the key before it looks at the body.
        let tenant = self.authenticate(headers).ok_or_else(|| {
            metrics::counter!("sluice_http_auth_failures_total").increment(1);
            ApiError::unauthorized()
        })?;

        if let Some(encoding) = headers.get(header::CONTENT_ENCODING) {
            if !encoding.as_bytes().eq_ignore_ascii_case(b"identity") {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Content-Encoding is not supported: send the JSON body uncompressed.",
                ));
            }
        }

        let announced = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > config.max_body_bytes as u64) {
            return Err(self.body_too_large());
        }
        let capacity = announced.map_or(0, |n| (n as usize).min(MAX_PREALLOCATION));
        let bytes = match timeout_at(deadline, read_body(body, config.max_body_bytes, capacity)).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("Timed out reading the request body ({:?}); nothing was sent. Retry.", config.request_timeout),
                ))
            }
            Ok(Err(BodyError::TooLarge)) => return Err(self.body_too_large()),
            Ok(Err(BodyError::Read(e))) => {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("Could not read the request body: {e}. Retry.")))
            }
            Ok(Ok(b)) => b,
        };

        let prepared = if bytes.len() <= INLINE_WORK_MAX_BYTES {
            self.prepare(&bytes, &tenant)?
        } else {
            let edge = self.clone();
            tokio::task::spawn_blocking(move || edge.prepare(&bytes, &tenant))
                .await
                .map_err(|e| ApiError::internal(format!("Internal server error while building the message ({e}); nothing was sent.")))??
        };

        if prepared.sandbox {
            // SendGrid's sandbox: the request is valid, nothing is queued, 200 instead of 202.
            metrics::counter!("sluice_http_sandbox_requests_total").increment(1);
            return Ok(StatusCode::OK.into_response());
        }

        let x_message_id = new_x_message_id();
        let count = prepared.submissions.len();
        let retry_after = config.retry_after.as_secs().max(1);
        match timeout_at(deadline, self.inner.ingest.accept(&x_message_id, prepared.submissions)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e @ (SpoolError::Unavailable(_) | SpoolError::Closed))) => {
                tracing::warn!(error = %e, "mail send refused: spool unavailable");
                return Err(ApiError::unavailable(
                    format!("The mail spool is temporarily unavailable; nothing was stored. Retry in {retry_after} seconds."),
                    retry_after,
                ));
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "mail send failed: spool error");
                return Err(ApiError::internal("Internal server error: the message could not be stored and was not sent. Retry later."));
            }
            Err(_) => {
                tracing::warn!(timeout = ?config.request_timeout, "mail send timed out waiting for the spool");
                return Err(ApiError::unavailable(
                    format!(
                        "Timed out storing the message; it may or may not have been stored (a retry can cause a duplicate). Retry in {retry_after} seconds."
                    ),
                    retry_after,
                ));
            }
        }
        metrics::counter!("sluice_http_accepted_messages_total").increment(count as u64);

        let mut response = StatusCode::ACCEPTED.into_response();
        let id = HeaderValue::from_str(&x_message_id).expect("base64url is a valid header value");
        response.headers_mut().insert("x-message-id", id);
        Ok(response)
    }

    /// The tenant (`apikey:<name>`) of a valid `Authorization: Bearer <key>`.
    fn authenticate(&self, headers: &HeaderMap) -> Option<String> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, key) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let tenant = self.inner.keys.verify(key.trim())?;
        Some(format!("apikey:{}", tenant.name))
    }

    fn body_too_large(&self) -> ApiError {
        ApiError::too_large(format!(
            "content too large: the request body exceeds {} bytes. Send smaller attachments, or split the request.",
            self.inner.config.max_body_bytes
        ))
    }

    /// Parses, validates and builds: the CPU part of a request.
    fn prepare(&self, body: &[u8], tenant: &str) -> Result<Prepared, ApiError> {
        let config = &self.inner.config;
        let req = request::parse(body).map_err(|e| ApiError::bad_request(vec![e]))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let plan = plan(req, now).map_err(ApiError::bad_request)?;

        let estimate = plan.estimated_message_bytes().saturating_mul(plan.envelopes.len());
        if estimate > config.max_request_message_bytes {
            return Err(self.messages_too_large(estimate));
        }
        let mut total = 0usize;
        let mut submissions = Vec::with_capacity(plan.envelopes.len());
        for env in &plan.envelopes {
            let smtp_id = format!("<{}@{}>", ulid::Ulid::new(), self.inner.hostname);
            let body = build_message(&plan, env, &smtp_id);
            if body.len() > config.max_message_bytes {
                return Err(ApiError::too_large(format!(
                    "content too large: the message is {} bytes once encoded, more than the {}-byte limit. Send smaller attachments.",
                    body.len(),
                    config.max_message_bytes
                )));
            }
            total += body.len();
            if total > config.max_request_message_bytes {
                return Err(self.messages_too_large(total));
            }
            let smtp_id = own_message_id(env).unwrap_or(smtp_id);
            let submission = Submission {
                tenant: tenant.to_string(),
                mail_from: env.from.email.clone(),
                recipients: env.recipients(),
                body: Bytes::from(body),
                smtp_id,
                categories: plan.categories.clone(),
                custom_args: env.custom_args.clone(),
                ip_pool: plan.ip_pool.clone(),
                send_at: env.send_at,
            };
            // E.g. DKIM policy: refused mail fails the whole request, and nothing is stored.
            self.inner.ingest.admit(&submission).map_err(|r| ApiError::bad_request(vec![FieldError::new(r.field, r.message)]))?;
            submissions.push(submission);
        }
        Ok(Prepared { sandbox: plan.sandbox, submissions })
    }

    fn messages_too_large(&self, bytes: usize) -> ApiError {
        ApiError::too_large(format!(
            "content too large: the personalizations of this request add up to about {bytes} bytes of mail, more than the {}-byte limit per request. Split the request.",
            self.inner.config.max_request_message_bytes
        ))
    }
}

/// A Message-ID the request set in its headers replaces the generated one.
fn own_message_id(env: &super::validate::Envelope) -> Option<String> {
    env.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("message-id")).map(|(_, v)| v.trim().to_string())
}

/// A SendGrid-shaped `X-Message-Id`: 22 URL-safe characters (a ULID's 16 bytes, base64url),
/// so ids sort roughly by time like the spool's.
fn new_x_message_id() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ulid::Ulid::new().to_bytes())
}

enum BodyError {
    TooLarge,
    Read(axum::Error),
}

async fn read_body(mut body: Body, limit: usize, capacity: usize) -> Result<Bytes, BodyError> {
    let mut buf = BytesMut::with_capacity(capacity);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_message_ids_look_like_sendgrids() {
        let id = new_x_message_id();
        assert_eq!(id.len(), 22);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(id, new_x_message_id());
    }
}
