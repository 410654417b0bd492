//! SendGrid's request rules. [`plan`] checks a parsed request, collects every violation
//! (SendGrid reports them all at once, with dotted field paths) and, when there is none,
//! resolves it into a [`MailPlan`]: one [`Envelope`] per personalization with its sender,
//! recipients, subject and headers settled and its substitutions applied, plus the parts
//! all of them share.

use std::collections::{BTreeMap, HashSet};

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;

use super::address::{has_line_break, is_header_name, is_mime_token, is_valid_email};
use super::error::FieldError;
use super::request::{Attachment, Content, EmailObject, MailSendRequest, Obj, Personalization};
use super::substitute::Substitutions;

pub const MAX_PERSONALIZATIONS: usize = 1000;
pub const MAX_RECIPIENTS: usize = 1000;
pub const MAX_CATEGORIES: usize = 10;
pub const MAX_CATEGORY_LEN: usize = 255;
pub const MAX_CUSTOM_ARGS_BYTES: usize = 10_000;
pub const MAX_SUBSTITUTIONS_BYTES: usize = 10_000;
pub const MAX_SEND_AT_AHEAD_SECS: u64 = 72 * 3600;

/// Headers the request may not set: SendGrid's list (the structure of the message and its
/// own tracking headers) plus MIME-Version, which sluice writes itself.
const RESERVED_HEADERS: &[&str] = &[
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
    "mime-version",
];

// SendGrid's own wording for the errors its clients' users know (see the module docs).
const PERSONALIZATIONS_REQUIRED: &str =
    "The personalizations field is required and must have at least one personalization.";
const TO_REQUIRED: &str = "The to array is required for all personalization objects, and must have at least one email object with a valid email address.";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    pub email: String,
    pub name: Option<String>,
}

/// One personalization, resolved: everything that differs between the messages of a request.
pub struct Envelope {
    pub from: Mailbox,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    /// After substitution; `None` only when a template id stands in for it.
    pub subject: Option<String>,
    /// Message-level headers overridden by the personalization's, after substitution.
    pub headers: Vec<(String, String)>,
    /// Applied to the content when the message is built.
    pub substitutions: Substitutions,
    /// Message-level custom args overridden by the personalization's.
    pub custom_args: BTreeMap<String, String>,
    /// Unix seconds; the personalization's wins.
    pub send_at: Option<u64>,
}

impl Envelope {
    /// RCPT TO: to, then cc, then bcc.
    pub fn recipients(&self) -> Vec<String> {
        self.to.iter().chain(&self.cc).chain(&self.bcc).map(|m| m.email.clone()).collect()
    }
}

/// A MIME type split into `type/subtype` (lower-cased) and its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MimeType {
    pub essence: String,
    pub params: Vec<(String, String)>,
}

pub struct ContentPart {
    pub mime_type: MimeType,
    pub value: String,
}

pub struct AttachmentPart {
    pub data: Vec<u8>,
    pub filename: String,
    pub mime_type: MimeType,
    /// `disposition: inline`.
    pub inline: bool,
    /// Without angle brackets.
    pub content_id: Option<String>,
}

/// A valid request, ready to be built into messages.
pub struct MailPlan {
    pub sandbox: bool,
    pub envelopes: Vec<Envelope>,
    pub reply_to: Vec<Mailbox>,
    /// text/plain first, then text/html, then any others (the validator enforces the order).
    pub contents: Vec<ContentPart>,
    pub attachments: Vec<AttachmentPart>,
    pub categories: Vec<String>,
    pub ip_pool: Option<String>,
}

impl MailPlan {
    /// A generous estimate of the MIME size of one message (base64 grows attachments by a
    /// third plus line breaks), to refuse oversized requests before building anything.
    pub fn estimated_message_bytes(&self) -> usize {
        let content: usize = self.contents.iter().map(|c| c.value.len() + c.value.len() / 8).sum();
        let attachments: usize = self.attachments.iter().map(|a| a.data.len() / 3 * 4 * 78 / 76 + a.filename.len()).sum();
        content + attachments + 2048
    }
}

/// Checks `req` against SendGrid's rules at time `now` (unix seconds).
pub fn plan(req: MailSendRequest, now: u64) -> Result<MailPlan, Vec<FieldError>> {
    let mut v = Validator { errors: Vec::new(), now };
    let plan = v.check(req);
    if v.errors.is_empty() {
        Ok(plan)
    } else {
        Err(v.errors)
    }
}

struct Validator {
    errors: Vec<FieldError>,
    now: u64,
}

impl Validator {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    fn check(&mut self, req: MailSendRequest) -> MailPlan {
        let has_template = req.template_id.as_deref().is_some_and(|t| !t.trim().is_empty());
        if has_template {
            // Accepting it would deliver whatever subject and content came with the request,
            // possibly none, to every recipient. The template's absence still relaxes the
            // subject and content checks below, so this is the one error such a request gets.
            self.err(
                "template_id",
                "sluice does not store or render templates: render the message yourself and send it as subject and content, without template_id.",
            );
        }

        let from = match &req.from {
            None => {
                self.err(
                    "from",
                    "The from object is required: give the sender as {\"email\": \"sender@example.com\", \"name\": \"Sender\"}.",
                );
                None
            }
            Some(f) => self.mailbox(f, "from", "from"),
        };

        let reply_to = self.reply_to(&req);

        let (subject, subject_ok) = match req.subject.as_deref() {
            Some("") => {
                self.err("subject", "The subject must be at least one character long; leave it out to set one per personalization.");
                (None, false)
            }
            Some(s) if has_line_break(s) => {
                self.err("subject", "The subject must not contain line breaks (CR or LF).");
                (None, false)
            }
            s => (s, true),
        };

        let message_headers = req.headers.as_ref().map(|h| self.headers(h, "headers")).unwrap_or_default();
        let message_args = req.custom_args.clone().unwrap_or_default();
        let message_args_ok = self.custom_args_size(&message_args, "custom_args");
        let send_at = req.send_at.filter(|&t| self.send_at(t, "send_at"));

        let mut envelopes = Vec::new();
        match &req.personalizations {
            None => self.err("personalizations", PERSONALIZATIONS_REQUIRED),
            Some(p) if p.is_empty() => self.err("personalizations", PERSONALIZATIONS_REQUIRED),
            Some(p) if p.len() > MAX_PERSONALIZATIONS => self.err(
                "personalizations",
                format!(
                    "The personalization block is limited to {MAX_PERSONALIZATIONS} personalizations per API request. You have provided {} personalizations. Please split this into several requests.",
                    p.len()
                ),
            ),
            Some(p) => {
                let mut total = 0;
                let shared = Shared {
                    from: from.as_ref(),
                    subject,
                    subject_ok,
                    headers: &message_headers,
                    custom_args: &message_args,
                    custom_args_ok: message_args_ok,
                    send_at,
                    has_template,
                };
                for (i, pers) in p.iter().enumerate() {
                    total += [&pers.to, &pers.cc, &pers.bcc].iter().map(|l| l.as_ref().map_or(0, Vec::len)).sum::<usize>();
                    if let Some(env) = self.personalization(pers, i, &shared) {
                        envelopes.push(env);
                    }
                }
                if total > MAX_RECIPIENTS {
                    self.err(
                        "personalizations",
                        format!("There is a limit of {MAX_RECIPIENTS} total recipients (to + cc + bcc) per request. This request has {total}; split it into several requests."),
                    );
                }
                if subject.is_none() && subject_ok && !has_template && p.iter().any(|p| p.subject.is_none()) {
                    self.err(
                        "subject",
                        "The subject is required: set subject, or a subject in every personalization (only a template_id can stand in for it).",
                    );
                }
            }
        }

        let contents = self.contents(req.content.as_deref(), has_template);
        let attachments = self.attachments(req.attachments.as_deref().unwrap_or_default());
        let categories = self.categories(req.categories.as_deref().unwrap_or_default());

        if let Some(pool) = &req.ip_pool_name {
            if !(2..=64).contains(&pool.chars().count()) || pool.chars().any(|c| c.is_control()) {
                self.err("ip_pool_name", "The ip_pool_name must be 2 to 64 characters long, without control characters.");
            }
        }

        MailPlan {
            sandbox: req.sandbox(),
            envelopes,
            reply_to,
            contents,
            attachments,
            categories,
            ip_pool: req.ip_pool_name.clone(),
        }
    }

    /// An email object at `field` (`from`, `personalizations.0.to.1`); `what` names it in
    /// messages (`to`, `from`, ...).
    fn mailbox(&mut self, obj: &EmailObject, field: &str, what: &str) -> Option<Mailbox> {
        let mut ok = true;
        match obj.email.as_deref() {
            None | Some("") => {
                self.err(format!("{field}.email"), format!("The {what} email parameter is required."));
                ok = false;
            }
            Some(e) if !is_valid_email(e) => {
                self.err(
                    format!("{field}.email"),
                    format!("Does not contain a valid address: {e:?}. Give a plain address such as name@example.com (the display name goes in \"name\")."),
                );
                ok = false;
            }
            Some(_) => {}
        }
        if obj.name.as_deref().is_some_and(has_line_break) {
            self.err(format!("{field}.name"), "The name must not contain line breaks (CR or LF).");
            ok = false;
        }
        ok.then(|| Mailbox {
            email: obj.email.clone().unwrap_or_default(),
            name: obj.name.clone().filter(|n| !n.trim().is_empty()),
        })
    }

    fn mailbox_list(&mut self, list: &[Obj<EmailObject>], field: &str, what: &str) -> Vec<Mailbox> {
        list.iter().enumerate().filter_map(|(j, obj)| self.mailbox(obj, &format!("{field}.{j}"), what)).collect()
    }

    fn reply_to(&mut self, req: &MailSendRequest) -> Vec<Mailbox> {
        match (&req.reply_to, &req.reply_to_list) {
            (Some(_), Some(_)) => {
                self.err("reply_to", "The reply_to and reply_to_list parameters are mutually exclusive: send only one of them.");
                Vec::new()
            }
            (Some(r), None) => self.mailbox(r, "reply_to", "reply_to").into_iter().collect(),
            (None, Some(list)) => {
                if list.len() > 1000 {
                    self.err("reply_to_list", "The reply_to_list may hold at most 1000 addresses.");
                }
                let boxes = self.mailbox_list(list, "reply_to_list", "reply_to_list");
                let mut seen = HashSet::new();
                for (j, m) in boxes.iter().enumerate() {
                    if !seen.insert(m.email.to_ascii_lowercase()) {
                        self.err(format!("reply_to_list.{j}.email"), format!("The reply_to_list must not contain {} twice.", m.email));
                    }
                }
                boxes
            }
            (None, None) => Vec::new(),
        }
    }

    fn personalization(&mut self, p: &Personalization, i: usize, shared: &Shared<'_>) -> Option<Envelope> {
        let at = format!("personalizations.{i}");
        let errors_before = self.errors.len();

        if p.to.as_ref().is_none_or(Vec::is_empty) {
            self.err(format!("{at}.to"), TO_REQUIRED);
        }
        let to = self.mailbox_list(p.to.as_deref().unwrap_or_default(), &format!("{at}.to"), "to");
        let cc = self.mailbox_list(p.cc.as_deref().unwrap_or_default(), &format!("{at}.cc"), "cc");
        let bcc = self.mailbox_list(p.bcc.as_deref().unwrap_or_default(), &format!("{at}.bcc"), "bcc");

        // The same address twice within one personalization (to, cc and bcc together).
        let mut seen = HashSet::new();
        for (list, name) in [(&p.to, "to"), (&p.cc, "cc"), (&p.bcc, "bcc")] {
            for (j, obj) in list.as_deref().unwrap_or_default().iter().enumerate() {
                let Some(email) = obj.email.as_deref().filter(|e| !e.is_empty()) else { continue };
                if !seen.insert(email.to_ascii_lowercase()) {
                    self.err(
                        format!("{at}.{name}.{j}.email"),
                        format!("Each unique email address in the personalizations array should only be included once. You have included {email} more than once."),
                    );
                }
            }
        }

        let from = match &p.from {
            Some(f) => self.mailbox(f, &format!("{at}.from"), "from"),
            None => shared.from.cloned(),
        };

        let own_subject = match p.subject.as_deref() {
            Some("") => {
                self.err(format!("{at}.subject"), "The subject must be at least one character long; leave it out to use the message's subject.");
                None
            }
            Some(s) if has_line_break(s) => {
                self.err(format!("{at}.subject"), "The subject must not contain line breaks (CR or LF).");
                None
            }
            s => s,
        };

        let own_headers = p.headers.as_ref().map(|h| self.headers(h, &format!("{at}.headers"))).unwrap_or_default();

        let subs_at = format!("{at}.substitutions");
        if let Some(subs) = &p.substitutions {
            if subs.keys().any(String::is_empty) {
                self.err(&subs_at, "Substitution keys must not be empty.");
            }
            let bytes: usize = subs.iter().map(|(k, v)| k.len() + v.len()).sum();
            if bytes > MAX_SUBSTITUTIONS_BYTES {
                self.err(&subs_at, format!("The substitutions of one personalization may total at most {MAX_SUBSTITUTIONS_BYTES} bytes; these have {bytes}."));
            }
        }

        let mut custom_args = shared.custom_args.clone();
        if let Some(own) = &p.custom_args {
            custom_args.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
            if shared.custom_args_ok {
                self.custom_args_size(&custom_args, &format!("{at}.custom_args"));
            }
        }
        let send_at = match p.send_at {
            Some(t) => self.send_at(t, &format!("{at}.send_at")).then_some(t),
            None => shared.send_at,
        };

        if self.errors.len() > errors_before || !shared.subject_ok {
            return None;
        }
        let from = from?;

        // Settle subject and headers, then apply the substitutions: a substitution value
        // must not smuggle a line break into a header.
        let substitutions = Substitutions::new(p.substitutions.as_ref());
        let subject = own_subject.or(shared.subject).map(|s| substitutions.apply(s).into_owned());
        let mut headers: Vec<(String, String)> = shared
            .headers
            .iter()
            .filter(|(name, _)| !own_headers.iter().any(|(own, _)| own.eq_ignore_ascii_case(name)))
            .chain(&own_headers)
            .map(|(n, v)| (n.clone(), substitutions.apply(v).into_owned()))
            .collect();
        headers.sort_by_key(|(n, _)| n.to_ascii_lowercase());
        if subject.as_deref().is_some_and(has_line_break) || headers.iter().any(|(_, v)| has_line_break(v)) {
            self.err(
                subs_at,
                "A substitution puts a line break (CR or LF) into the subject or a header value; line breaks are only allowed in content.",
            );
            return None;
        }
        if subject.is_none() && !shared.has_template {
            return None; // reported once, at "subject"
        }

        Some(Envelope { from, to, cc, bcc, subject, headers, substitutions, custom_args, send_at })
    }

    /// Checks a `headers` object; returns its entries.
    fn headers(&mut self, headers: &BTreeMap<String, String>, at: &str) -> Vec<(String, String)> {
        for (name, value) in headers {
            let field = format!("{at}.{name}");
            if !is_header_name(name) {
                self.err(field, "Header names must be printable ASCII without spaces or colons.");
            } else if RESERVED_HEADERS.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                self.err(
                    field,
                    format!("The {name} header is reserved and cannot be set in headers; use the request's own fields (from, subject, personalizations, content, ...) instead."),
                );
            } else if has_line_break(value) {
                self.err(field, "Header values must not contain line breaks (CR or LF).");
            } else if (name.eq_ignore_ascii_case("message-id") && !is_message_id(value))
                || (name.eq_ignore_ascii_case("date") && value.trim().is_empty())
            {
                self.err(field, format!("The {name} header is not valid; leave it out and sluice sets it."));
            }
        }
        headers.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
    }

    fn custom_args_size(&mut self, args: &BTreeMap<String, String>, at: &str) -> bool {
        let bytes = serde_json::to_string(args).map_or(0, |s| s.len());
        if bytes > MAX_CUSTOM_ARGS_BYTES {
            self.err(
                at,
                format!("The total length of custom arguments must be less than {MAX_CUSTOM_ARGS_BYTES} bytes; these have {bytes}."),
            );
            return false;
        }
        true
    }

    fn send_at(&mut self, t: u64, at: &str) -> bool {
        if t > self.now + MAX_SEND_AT_AHEAD_SECS {
            self.err(at, "The send_at parameter must be a unix timestamp (seconds) no more than 72 hours in the future.");
            return false;
        }
        true
    }

    fn contents(&mut self, contents: Option<&[Obj<Content>]>, has_template: bool) -> Vec<ContentPart> {
        let contents = contents.unwrap_or_default();
        if contents.is_empty() {
            if !has_template {
                self.err(
                    "content",
                    "Unless a template_id is provided, the content parameter is required: give at least one {\"type\": \"text/plain\", \"value\": \"...\"} block.",
                );
            }
            return Vec::new();
        }
        let mut parts = Vec::new();
        for (j, c) in contents.iter().enumerate() {
            let mime_type = match c.mime_type.as_deref() {
                None | Some("") => {
                    self.err(format!("content.{j}.type"), "The content type is required and must be at least one character long (e.g. text/plain).");
                    None
                }
                Some(t) => {
                    let parsed = parse_mime_type(t);
                    if parsed.is_none() {
                        self.err(format!("content.{j}.type"), format!("{t:?} is not a valid MIME type (type/subtype, e.g. text/html)."));
                    }
                    parsed
                }
            };
            if c.value.as_deref().is_none_or(str::is_empty) {
                self.err(format!("content.{j}.value"), "The content value must be a string at least one character in length.");
            }
            if let (Some(mime_type), Some(value)) = (mime_type, c.value.clone()) {
                parts.push(ContentPart { mime_type, value });
            }
        }
        if parts.len() == contents.len() {
            let kinds: Vec<&str> = parts.iter().map(|p| p.mime_type.essence.as_str()).collect();
            let plain = kinds.iter().filter(|k| **k == "text/plain").count();
            let html = kinds.iter().filter(|k| **k == "text/html").count();
            let html_pos = kinds.iter().position(|k| *k == "text/html");
            let first_other = kinds.iter().position(|k| *k != "text/plain" && *k != "text/html");
            if plain > 1 || html > 1 {
                self.err("content", "text/plain and text/html may each be given only once.");
            } else if plain == 1 && kinds[0] != "text/plain" {
                self.err("content", "If present, text/plain must be first, followed by text/html, followed by any other content.");
            } else if let (Some(h), Some(o)) = (html_pos, first_other) {
                if o < h {
                    self.err("content", "If present, text/plain must be first, followed by text/html, followed by any other content.");
                }
            }
        }
        parts
    }

    fn attachments(&mut self, attachments: &[Obj<Attachment>]) -> Vec<AttachmentPart> {
        let mut parts = Vec::new();
        for (j, a) in attachments.iter().enumerate() {
            let at = format!("attachments.{j}");
            let errors_before = self.errors.len();
            let data = match a.content.as_deref() {
                None | Some("") => {
                    self.err(format!("{at}.content"), "The attachment content is required: the file, base64-encoded.");
                    None
                }
                Some(c) => {
                    let decoded = decode_base64(c);
                    if decoded.is_none() {
                        self.err(format!("{at}.content"), "The attachment content must be base64 encoded.");
                    }
                    decoded
                }
            };
            match a.filename.as_deref() {
                None | Some("") => self.err(format!("{at}.filename"), "The attachment filename is required."),
                Some(f) if has_line_break(f) || f.chars().any(char::is_control) => {
                    self.err(format!("{at}.filename"), "The attachment filename must not contain line breaks or other control characters.")
                }
                Some(_) => {}
            }
            let mime_type = match a.mime_type.as_deref() {
                None => Some(MimeType { essence: "application/octet-stream".into(), params: Vec::new() }),
                Some(t) => {
                    let parsed = parse_mime_type(t);
                    if parsed.is_none() {
                        self.err(format!("{at}.type"), format!("{t:?} is not a valid MIME type (type/subtype, e.g. application/pdf)."));
                    }
                    parsed
                }
            };
            let inline = match a.disposition.as_deref() {
                None | Some("attachment") => false,
                Some("inline") => true,
                Some(_) => {
                    self.err(format!("{at}.disposition"), "The attachment disposition must be either \"inline\" or \"attachment\".");
                    false
                }
            };
            let content_id = a.content_id.as_deref().map(|cid| cid.trim().trim_start_matches('<').trim_end_matches('>'));
            if let Some(cid) = content_id {
                if cid.is_empty() || !cid.bytes().all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>') {
                    self.err(format!("{at}.content_id"), "The content_id must be printable ASCII without spaces or line breaks.");
                }
            }
            if self.errors.len() == errors_before {
                parts.push(AttachmentPart {
                    data: data.unwrap_or_default(),
                    filename: a.filename.clone().unwrap_or_default(),
                    mime_type: mime_type.unwrap_or_else(|| MimeType { essence: "application/octet-stream".into(), params: Vec::new() }),
                    inline,
                    content_id: content_id.map(str::to_string),
                });
            }
        }
        parts
    }

    fn categories(&mut self, categories: &[String]) -> Vec<String> {
        if categories.len() > MAX_CATEGORIES {
            self.err("categories", format!("You may not use more than {MAX_CATEGORIES} categories per email."));
        }
        let mut seen = HashSet::new();
        for (j, c) in categories.iter().enumerate() {
            if c.chars().count() > MAX_CATEGORY_LEN {
                self.err(format!("categories.{j}"), format!("A category may not exceed {MAX_CATEGORY_LEN} characters."));
            }
            if !seen.insert(c.as_str()) {
                self.err(format!("categories.{j}"), format!("The category {c:?} is given twice; categories must be unique."));
            }
        }
        categories.to_vec()
    }
}

/// What every personalization inherits from the message level.
struct Shared<'a> {
    from: Option<&'a Mailbox>,
    subject: Option<&'a str>,
    /// False when the message-level subject was invalid (already reported).
    subject_ok: bool,
    headers: &'a [(String, String)],
    custom_args: &'a BTreeMap<String, String>,
    custom_args_ok: bool,
    send_at: Option<u64>,
    has_template: bool,
}

/// `<left@right>` without spaces.
fn is_message_id(value: &str) -> bool {
    let v = value.trim();
    v.starts_with('<') && v.ends_with('>') && v.contains('@') && v.bytes().all(|b| b.is_ascii_graphic())
}

/// Standard base64; padding optional and whitespace (line-wrapped encoders) ignored.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    if s.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        ENGINE.decode(compact).ok()
    } else {
        ENGINE.decode(s).ok()
    }
}

/// Parses `type/subtype; name=value; ...`.
pub fn parse_mime_type(s: &str) -> Option<MimeType> {
    if has_line_break(s) {
        return None;
    }
    let mut pieces = s.split(';');
    let essence = pieces.next()?.trim();
    let (top, sub) = essence.split_once('/')?;
    if !is_mime_token(top) || !is_mime_token(sub) {
        return None;
    }
    let mut params = Vec::new();
    for piece in pieces {
        let piece = piece.trim();
        if piece.is_empty() {
            continue;
        }
        let (name, value) = piece.split_once('=')?;
        let (name, value) = (name.trim(), value.trim().trim_matches('"'));
        if !is_mime_token(name) || value.chars().any(char::is_control) {
            return None;
        }
        params.push((name.to_ascii_lowercase(), value.to_string()));
    }
    Some(MimeType { essence: essence.to_ascii_lowercase(), params })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types_parse_with_parameters() {
        let t = parse_mime_type("Text/Calendar; method=REQUEST; charset=\"utf-8\"").unwrap();
        assert_eq!(t.essence, "text/calendar");
        assert_eq!(t.params, vec![("method".into(), "REQUEST".into()), ("charset".into(), "utf-8".into())]);
        assert!(parse_mime_type("text").is_none());
        assert!(parse_mime_type("text/plain\r\nX-Evil: 1").is_none());
        assert!(parse_mime_type("text/plain; broken").is_none());
    }

    #[test]
    fn base64_accepts_wrapped_and_unpadded_input() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVs\r\nbG8").unwrap(), b"hello");
        assert!(decode_base64("not base64!").is_none());
    }
}
