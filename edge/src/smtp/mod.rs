//! The SMTP relay for legacy applications.
