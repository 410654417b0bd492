//! SMTP replies. Every final reply carries an RFC 3463 enhanced status code; only the
//! greeting, the EHLO capability list and the intermediate 334/354 replies have none, as
//! RFC 2034 prescribes.

use std::borrow::Cow;

/// A single-line final reply: `<code> <class>.<subject>.<detail> <text>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub code: u16,
    pub status: [u8; 3],
    pub text: Cow<'static, str>,
}

impl Reply {
    pub(crate) const fn new(code: u16, status: [u8; 3], text: &'static str) -> Self {
        Reply { code, status, text: Cow::Borrowed(text) }
    }

    pub(crate) fn with_text(code: u16, status: [u8; 3], text: String) -> Self {
        Reply { code, status, text: Cow::Owned(text) }
    }

    /// A permanent failure; counts towards the session's `max_errors`.
    pub(crate) fn is_error(&self) -> bool {
        self.code >= 500
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        let [class, subject, detail] = self.status;
        smtp_proto::Response::new(self.code, class, subject, detail, &*self.text)
            .write(out)
            .expect("writing to a Vec cannot fail");
    }
}

pub(crate) const OK: Reply = Reply::new(250, [2, 0, 0], "Ok");
pub(crate) const SENDER_OK: Reply = Reply::new(250, [2, 1, 0], "Sender ok");
pub(crate) const RECIPIENT_OK: Reply = Reply::new(250, [2, 1, 5], "Recipient ok");
pub(crate) const BYE: Reply = Reply::new(221, [2, 0, 0], "Bye");
pub(crate) const READY_FOR_TLS: Reply = Reply::new(220, [2, 0, 0], "Ready to start TLS");
pub(crate) const AUTH_OK: Reply = Reply::new(235, [2, 7, 0], "Authentication successful");
pub(crate) const CANNOT_VRFY: Reply =
    Reply::new(252, [2, 5, 2], "Cannot VRFY user, but will accept message and attempt delivery");
pub(crate) const HELP: Reply =
    Reply::new(214, [2, 0, 0], "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS AUTH VRFY HELP (RFC 5321)");

pub(crate) const UNRECOGNIZED: Reply = Reply::new(500, [5, 5, 1], "Command unrecognized");
pub(crate) const LINE_TOO_LONG: Reply = Reply::new(500, [5, 5, 2], "Line too long (the limit is 4096 bytes)");
pub(crate) const AUTH_LINE_TOO_LONG: Reply = Reply::new(500, [5, 5, 6], "Authentication exchange line is too long");
pub(crate) const NOT_IMPLEMENTED: Reply = Reply::new(502, [5, 5, 1], "Command not implemented");
pub(crate) const EXPN_NOT_IMPLEMENTED: Reply = Reply::new(502, [5, 5, 1], "EXPN is not supported");
pub(crate) const BDAT_NOT_IMPLEMENTED: Reply =
    Reply::new(502, [5, 5, 1], "BDAT is not supported (CHUNKING is not offered); use DATA");
pub(crate) const NEED_HELO: Reply = Reply::new(503, [5, 5, 1], "Send EHLO or HELO first");
pub(crate) const NEED_EHLO: Reply = Reply::new(503, [5, 5, 1], "Send EHLO first");
pub(crate) const NESTED_MAIL: Reply = Reply::new(503, [5, 5, 1], "Nested MAIL command (send RSET first)");
pub(crate) const NEED_MAIL: Reply = Reply::new(503, [5, 5, 1], "Send MAIL first");
pub(crate) const NEED_RCPT: Reply = Reply::new(503, [5, 5, 1], "Send RCPT first (no valid recipients)");
pub(crate) const ALREADY_AUTHENTICATED: Reply = Reply::new(503, [5, 5, 1], "Already authenticated");
pub(crate) const AUTH_IN_TRANSACTION: Reply =
    Reply::new(503, [5, 5, 1], "AUTH is not allowed during a mail transaction (send RSET first)");
pub(crate) const ALREADY_TLS: Reply = Reply::new(503, [5, 5, 1], "TLS is already active");
pub(crate) const UNKNOWN_MECHANISM: Reply =
    Reply::new(504, [5, 5, 4], "Unrecognized authentication mechanism; use PLAIN or LOGIN");
pub(crate) const AUTH_CANCELLED: Reply = Reply::new(501, [5, 7, 0], "Authentication cancelled");
pub(crate) const BAD_CREDENTIALS: Reply = Reply::new(535, [5, 7, 8], "Authentication credentials invalid");
pub(crate) const AUTH_NEEDS_TLS: Reply =
    Reply::new(538, [5, 7, 11], "Encryption required for requested authentication mechanism; send STARTTLS first");
pub(crate) const AUTH_REQUIRED: Reply = Reply::new(530, [5, 7, 0], "Authentication required");
pub(crate) const BAD_SENDER_SYNTAX: Reply = Reply::new(501, [5, 1, 7], "Bad sender address syntax");
pub(crate) const BAD_RECIPIENT_SYNTAX: Reply =
    Reply::new(501, [5, 1, 3], "Bad recipient address syntax (a mailbox at a domain name is required)");
pub(crate) const NEEDS_SMTPUTF8: Reply =
    Reply::new(553, [5, 6, 7], "Non-ASCII addresses require the SMTPUTF8 parameter on MAIL");
pub(crate) const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, [4, 5, 3], "Too many recipients");
pub(crate) const SPOOL_UNAVAILABLE: Reply =
    Reply::new(451, [4, 3, 0], "Mail system temporarily unavailable; the message was not queued, try again later");
pub(crate) const LOCAL_ERROR: Reply =
    Reply::new(451, [4, 3, 0], "Local error in processing; the message was not queued, try again later");

/// A reply that ends the session (`421`): the server closes the connection after it.
pub(crate) fn closing(hostname: &str, status: [u8; 3], why: &str) -> Reply {
    Reply::with_text(421, status, format!("{hostname} {why}, closing connection"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_code_status_and_text() {
        let mut out = Vec::new();
        TOO_MANY_RECIPIENTS.write(&mut out);
        AUTH_NEEDS_TLS.write(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "452 4.5.3 Too many recipients\r\n538 5.7.11 Encryption required for requested authentication mechanism; send STARTTLS first\r\n"
        );
    }
}
