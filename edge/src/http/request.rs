//! The JSON body of `POST /v3/mail/send`, and turning its type errors into SendGrid-shaped
//! field errors.
//!
//! Almost every field is optional here so that missing values are reported by the
//! validator with SendGrid's wording (and all at once) instead of by serde (one at a time).
//! Serde only enforces JSON types. Fields sluice accepts but does not act on
//! (`asm`, `batch_id`, `tracking_settings`, `dynamic_template_data`, most of
//! `mail_settings`, ...) and unknown fields are skipped; docs/http-api.md lists which fields
//! are honoured and which are ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::error::FieldError;

/// A JSON object read as `T`. Serde's derived struct impls also accept an array of the
/// field values (`["a@example.com"]` as an email object); SendGrid answers that with a type
/// error, and so does sluice.
#[derive(Clone, Debug, Default)]
pub struct Obj<T>(pub T);

impl<T> Deref for Obj<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        de.deserialize_map(ObjectVisitor(PhantomData)).map(Obj)
    }
}

/// `{ "email": ..., "name": ... }`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EmailObject {
    pub email: Option<String>,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Personalization {
    pub to: Option<Vec<Obj<EmailObject>>>,
    pub cc: Option<Vec<Obj<EmailObject>>>,
    pub bcc: Option<Vec<Obj<EmailObject>>>,
    pub from: Option<Obj<EmailObject>>,
    pub subject: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub substitutions: Option<BTreeMap<String, String>>,
    pub custom_args: Option<BTreeMap<String, String>>,
    pub send_at: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Content {
    #[serde(rename = "type")]
    pub mime_type: Option<String>,
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Attachment {
    /// Base64 of the file.
    pub content: Option<String>,
    pub filename: Option<String>,
    #[serde(rename = "type")]
    pub mime_type: Option<String>,
    /// `attachment` (default) or `inline`.
    pub disposition: Option<String>,
    pub content_id: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Toggle {
    pub enable: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct MailSettings {
    /// Validate only: answer 200 and send nothing.
    pub sandbox_mode: Option<Obj<Toggle>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct MailSendRequest {
    pub personalizations: Option<Vec<Obj<Personalization>>>,
    pub from: Option<Obj<EmailObject>>,
    pub reply_to: Option<Obj<EmailObject>>,
    pub reply_to_list: Option<Vec<Obj<EmailObject>>>,
    pub subject: Option<String>,
    pub content: Option<Vec<Obj<Content>>>,
    pub attachments: Option<Vec<Obj<Attachment>>>,
    /// sluice has no templates: a request naming one is refused (400 on `template_id`).
    pub template_id: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub categories: Option<Vec<String>>,
    pub custom_args: Option<BTreeMap<String, String>>,
    pub send_at: Option<u64>,
    // `batch_id` is skipped like the other ignored fields: sluice has no Scheduled Sends
    // API to pause or cancel a batch with.
    pub ip_pool_name: Option<String>,
    pub mail_settings: Option<Obj<MailSettings>>,
}

impl MailSendRequest {
    pub fn sandbox(&self) -> bool {
        self.mail_settings
            .as_ref()
            .and_then(|m| m.sandbox_mode.as_ref())
            .and_then(|s| s.enable)
            .unwrap_or(false)
    }
}

/// Parses the body. A JSON syntax error or a value of the wrong type becomes one field
/// error with a dotted path (`personalizations.0.to`), as SendGrid reports them.
pub fn parse(body: &[u8]) -> Result<MailSendRequest, FieldError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: Result<Obj<MailSendRequest>, _> = serde_path_to_error::deserialize(&mut de);
    let request = match parsed {
        Ok(r) => r.0,
        Err(e) => return Err(describe(e)),
    };
    // Trailing garbage after the object is a syntax error too.
    de.end().map_err(|e| syntax_error(&e))?;
    Ok(request)
}

fn describe(e: serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let path = dotted_path(e.path());
    let inner = e.into_inner();
    match inner.classify() {
        serde_json::error::Category::Data => {
            let field = (!path.is_empty()).then_some(path);
            FieldError { message: type_message(strip_position(&inner.to_string())), field, help: None }
        }
        _ => syntax_error(&inner),
    }
}

fn syntax_error(e: &serde_json::Error) -> FieldError {
    FieldError::general(format!(
        "Bad Request: the body is not valid JSON ({}). Send a JSON object with Content-Type: application/json.",
        e
    ))
}

/// `personalizations[0].to` as SendGrid writes it: `personalizations.0.to`.
fn dotted_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = Vec::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push(index.to_string()),
            Segment::Map { key } => out.push(key.clone()),
            Segment::Enum { variant } => out.push(variant.clone()),
            Segment::Unknown => {}
        }
    }
    out.join(".")
}

/// serde_json appends " at line L column C"; the field path says more than that.
fn strip_position(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    }
}

/// Rewrites serde's `invalid type: string "x", expected object` as SendGrid's
/// `Invalid type. Expected: object, given: string.`; other data errors are passed on.
fn type_message(serde_message: &str) -> String {
    let Some(rest) = serde_message.strip_prefix("invalid type: ") else {
        let mut m = serde_message.to_string();
        if let Some(first) = m.get_mut(..1) {
            first.make_ascii_uppercase();
        }
        return m;
    };
    let Some((unexpected, expected)) = rest.rsplit_once(", expected ") else {
        return format!("Invalid type: {rest}.");
    };
    let given = [
        ("string", "string"),
        ("integer", "integer"),
        ("floating point", "number"),
        ("boolean", "boolean"),
        ("null", "null"),
        ("unit", "null"),
        ("map", "object"),
        ("sequence", "array"),
    ]
    .iter()
    .find(|(prefix, _)| unexpected.starts_with(prefix))
    .map(|(_, name)| *name)
    .unwrap_or(unexpected);
    let expected = expected.trim_start_matches("a ").trim_start_matches("an ");
    let expected = match expected {
        "sequence" => "array",
        "map" => "object",
        "u64" | "u32" | "i64" => "integer",
        e if e.starts_with("struct ") => "object",
        e => e,
    };
    format!("Invalid type. Expected: {expected}, given: {given}.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_get_dotted_paths_and_sendgrid_wording() {
        let e = parse(br#"{"personalizations":[{"to":["a@b.com"]}]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("personalizations.0.to.0"));
        assert_eq!(e.message, "Invalid type. Expected: object, given: string.");

        let e = parse(br#"{"personalizations":[null]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("personalizations.0"));
        assert_eq!(e.message, "Invalid type. Expected: object, given: null.");

        let e = parse(br#"{"from":{"email":"a@b.com"},"send_at":"soon"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("send_at"));
        assert_eq!(e.message, "Invalid type. Expected: integer, given: string.");

        let e = parse(br#"{"headers":{"X-A":1}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("headers.X-A"));
        assert_eq!(e.message, "Invalid type. Expected: string, given: integer.");

        let e = parse(br#"{"categories":"one"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("categories"));
        assert_eq!(e.message, "Invalid type. Expected: array, given: string.");

        let e = parse(br#"{"mail_settings":{"sandbox_mode":{"enable":"true"}}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("mail_settings.sandbox_mode.enable"));
        assert_eq!(e.message, "Invalid type. Expected: boolean, given: string.");
    }

    #[test]
    fn syntax_errors_are_general() {
        let e = parse(b"{\"personalizations\": [").unwrap_err();
        assert_eq!(e.field, None);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse(b"{} trailing").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse(b"[]").unwrap_err();
        assert_eq!(e.message, "Invalid type. Expected: object, given: array.");
        let e = parse(br#"{"from":["a@b.com"]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("from"));
        assert_eq!(e.message, "Invalid type. Expected: object, given: array.");
    }

    #[test]
    fn ignored_fields_are_accepted() {
        let r = parse(
            br#"{"asm":{"group_id":1},"tracking_settings":{"click_tracking":{"enable":true}},"batch_id":"b-1",
                 "mail_settings":{"footer":{"enable":true},"sandbox_mode":{"enable":true}},
                 "personalizations":[{"to":[{"email":"a@b.com"}],"dynamic_template_data":{"x":[1]}}],
                 "whatever":1}"#,
        )
        .unwrap();
        assert!(r.sandbox());
    }
}
