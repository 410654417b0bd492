//! Error answers in SendGrid's shape: `{"errors":[{"message","field","help"}]}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// SendGrid's exact 401 message (clients and their users grep for it).
pub const UNAUTHORIZED_MESSAGE: &str = "The provided authorization grant is invalid, expired, or revoked";

/// One entry of the `errors` array. Field order matters: it is the order SendGrid writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub message: String,
    /// Dotted path of the offending field (`personalizations.0.to.0.email`), or null.
    pub field: Option<String>,
    /// A documentation link in SendGrid's answers; sluice has none to offer, so null.
    pub help: Option<String>,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { message: message.into(), field: Some(field.into()), help: None }
    }

    /// An error about the request as a whole (`"field": null`).
    pub fn general(message: impl Into<String>) -> Self {
        FieldError { message: message.into(), field: None, help: None }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    errors: &'a [FieldError],
}

/// A failed request: the status and the errors to report.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub errors: Vec<FieldError>,
    /// Seconds for a `Retry-After` header (503 answers).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, errors: vec![FieldError::general(message)], retry_after: None }
    }

    pub fn bad_request(errors: Vec<FieldError>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, errors, retry_after: None }
    }

    pub fn unauthorized() -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, UNAUTHORIZED_MESSAGE)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after_secs: u64) -> Self {
        ApiError { retry_after: Some(retry_after_secs), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message) }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

/// The JSON body SendGrid's clients parse for every error status.
pub fn error_body(errors: &[FieldError]) -> Vec<u8> {
    serde_json::to_vec(&ErrorBody { errors }).unwrap_or_else(|_| br#"{"errors":[]}"#.to_vec())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, error_body(&self.errors)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_body_is_sendgrids_byte_for_byte() {
        let body = error_body(&ApiError::unauthorized().errors);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"errors":[{"message":"The provided authorization grant is invalid, expired, or revoked","field":null,"help":null}]}"#
        );
        assert_eq!(body.len(), 116, "SendGrid's real 401 has Content-Length 116");
    }
}
