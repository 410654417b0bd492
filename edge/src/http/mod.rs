//! The SendGrid v3 compatible HTTP API (`POST /v3/mail/send`).
