//! The edge: where mail enters sluice. It accepts messages over HTTP (SendGrid's v3 Mail
//! Send API) and SMTP (a relay for legacy applications), writes them durably into the spool
//! and only then acknowledges them. It knows nothing about delivery.

pub mod auth;
pub mod http;
pub mod smtp;
pub mod submit;

pub use auth::{ApiKeyConfig, ApiKeys, Tenant};
pub use submit::{AdmissionCheck, Ingest, Refusal, Submission};
