//! Builds the RFC 5322 message of one personalization with mail-builder.
//!
//! Structure, outermost first (levels that would hold a single part are left out):
//! `multipart/mixed` [ `multipart/related` [ `multipart/alternative` [text/plain,
//! text/html, other content], inline parts with a content id ], attachments ].

use std::borrow::Cow;

use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::headers::HeaderType;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;

use super::validate::{AttachmentPart, ContentPart, Envelope, Mailbox, MailPlan, MimeType};

/// The message of `env`, with CRLF line endings. `message_id` is the Message-ID header
/// value with angle brackets; a Message-ID or Date header in the request replaces ours.
pub fn build_message(plan: &MailPlan, env: &Envelope, message_id: &str) -> Vec<u8> {
    let own_message_id = header_value(env, "message-id");
    let own_date = header_value(env, "date");

    let mut builder = MessageBuilder::new().from(address(&env.from)).to(address_list(&env.to));
    if !env.cc.is_empty() {
        builder = builder.cc(address_list(&env.cc));
    }
    // Bcc recipients are in the envelope only: a Bcc header would disclose them.
    if !plan.reply_to.is_empty() {
        builder = builder.reply_to(address_list(&plan.reply_to));
    }
    if let Some(subject) = &env.subject {
        builder = builder.subject(Text::new(subject.as_str()));
    }
    builder = match own_message_id {
        Some(id) => builder.header("Message-ID", Raw::new(id.trim())),
        None => builder.message_id(message_id.trim_start_matches('<').trim_end_matches('>')),
    };
    builder = match own_date {
        Some(date) => builder.header("Date", Raw::new(date.trim())),
        None => builder.date(mail_builder::headers::date::Date::now()),
    };
    for (name, value) in &env.headers {
        if name.eq_ignore_ascii_case("message-id") || name.eq_ignore_ascii_case("date") {
            continue;
        }
        builder = builder.header(name.as_str(), header(value));
    }

    let body = body(plan, env);
    let mut out = Vec::with_capacity(plan.estimated_message_bytes());
    builder.body(body).write_to(&mut out).expect("writing into a Vec cannot fail");
    out
}

fn header_value<'a>(env: &'a Envelope, name: &str) -> Option<&'a str> {
    env.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// ASCII values are written as they are (RFC 2047 encoding would break structured headers
/// such as List-Unsubscribe); others are encoded as unstructured text.
fn header(value: &str) -> HeaderType<'_> {
    if value.is_ascii() {
        Raw::new(value).into()
    } else {
        Text::new(value).into()
    }
}

fn address(m: &Mailbox) -> Address<'_> {
    Address::new_address(m.name.as_deref(), m.email.as_str())
}

fn address_list(list: &[Mailbox]) -> Address<'_> {
    match list {
        [one] => address(one),
        many => Address::new_list(many.iter().map(address).collect()),
    }
}

fn body<'a>(plan: &'a MailPlan, env: &Envelope) -> MimePart<'a> {
    let mut alternatives: Vec<MimePart<'a>> = plan.contents.iter().map(|c| content_part(c, env)).collect();
    let mut body = match alternatives.len() {
        0 => MimePart::new("text/plain", ""),
        1 => alternatives.remove(0),
        _ => MimePart::new("multipart/alternative", alternatives),
    };

    let (related, mixed): (Vec<&AttachmentPart>, Vec<&AttachmentPart>) =
        plan.attachments.iter().partition(|a| a.inline && a.content_id.is_some());
    if !related.is_empty() {
        let mut parts = vec![body];
        parts.extend(related.into_iter().map(attachment_part));
        body = MimePart::new("multipart/related", parts);
    }
    if !mixed.is_empty() {
        let mut parts = vec![body];
        parts.extend(mixed.into_iter().map(attachment_part));
        body = MimePart::new("multipart/mixed", parts);
    }
    body
}

/// A content block with the personalization's substitutions applied, always UTF-8 (the
/// JSON string is) and with CRLF line endings (bare LF is refused by many receivers).
fn content_part<'a>(c: &'a ContentPart, env: &Envelope) -> MimePart<'a> {
    let text = crlf(env.substitutions.apply(&c.value));
    let mut ct = content_type(&c.mime_type, |name| name != "charset");
    ct = ct.attribute("charset", "utf-8");
    MimePart::new(ct, BodyPart::Text(text))
}

fn attachment_part<'a>(a: &'a AttachmentPart) -> MimePart<'a> {
    let ct = content_type(&a.mime_type, |_| true);
    let disposition = ContentType::new(if a.inline { "inline" } else { "attachment" }).attribute("filename", a.filename.as_str());
    let mut part = MimePart::new(ct, BodyPart::Binary(Cow::Borrowed(a.data.as_slice()))).header("Content-Disposition", disposition);
    if let Some(cid) = &a.content_id {
        part = part.cid(cid.as_str());
    }
    part
}

fn content_type<'a>(t: &'a MimeType, keep: impl Fn(&str) -> bool) -> ContentType<'a> {
    let mut ct = ContentType::new(t.essence.as_str());
    for (name, value) in t.params.iter().filter(|(n, _)| keep(n)) {
        ct = ct.attribute(name.as_str(), value.as_str());
    }
    ct
}

/// Normalizes CR, LF and CRLF line endings to CRLF.
fn crlf(text: Cow<'_, str>) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let clean = bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    });
    if clean {
        return text;
    }
    let mut out = String::with_capacity(text.len() + text.len() / 32);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("\r\n");
            }
            '\n' => out.push_str("\r\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_endings_become_crlf() {
        assert_eq!(crlf("a\nb\r\nc\rd".into()), "a\r\nb\r\nc\r\nd");
        assert!(matches!(crlf("a\r\nb".into()), Cow::Borrowed(_)));
    }
}
