//! The built-in fallback classification: RFC 3463 enhanced codes, then the RFC 5321 reply
//! class. The rules table consults this when none of its rules match.

use std::sync::{Arc, OnceLock};

use crate::{BounceClass, BounceType, Classify, Context, Disposition, Outcome, Reply, ShapingAction};

/// The fallback classifier: 2xx delivered, 4xx retry, 5xx bounce, classified by the
/// enhanced status code when there is one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Builtin;

impl Builtin {
    pub const VERSION: &'static str = "builtin-1";
}

/// The built-in version string, shared so a classification costs no allocation for it.
fn version() -> Arc<str> {
    static VERSION: OnceLock<Arc<str>> = OnceLock::new();
    VERSION.get_or_init(|| Arc::from(Builtin::VERSION)).clone()
}

/// The fallback layers after a rules table, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackLayer {
    /// RFC 3463 enhanced status code (only replies that carry one, and not 2xx).
    Rfc3463,
    /// RFC 5321 reply class: always applies.
    Rfc5321,
}

impl FallbackLayer {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackLayer::Rfc3463 => "builtin:rfc3463",
            FallbackLayer::Rfc5321 => "builtin:rfc5321",
        }
    }
}

fn outcome(reply: &Reply, disposition: Disposition, classification: BounceClass, reason: &str, rule_id: String, rules_version: Arc<str>) -> Outcome {
    Outcome {
        disposition,
        classification,
        reason: reason.to_string(),
        bounce_type: BounceType::default_for(classification, reply.class()),
        // Only a permanent "no such address" is worth suppressing without a rule saying so.
        suppress: disposition == Disposition::Bounce && reply.class() == 5 && classification == BounceClass::InvalidAddress,
        rule_id,
        shaping: ShapingAction::None,
        rules_version,
    }
}

/// The RFC 3463 layer: classifies by the enhanced code; `None` for 2xx replies and replies
/// without an enhanced code.
pub(crate) fn rfc3463(reply: &Reply, rules_version: &Arc<str>) -> Option<Outcome> {
    let e = reply.enhanced?;
    let disposition = Disposition::of_class(reply.class());
    if disposition == Disposition::Delivered {
        return None;
    }
    let (c, r) = by_enhanced(e.subject, e.detail);
    Some(outcome(reply, disposition, c, r, format!("builtin:rfc3463:x.{}.{}", e.subject, e.detail), rules_version.clone()))
}

/// The RFC 5321 layer: the reply class alone.
pub(crate) fn rfc5321(reply: &Reply, rules_version: &Arc<str>) -> Outcome {
    let disposition = Disposition::of_class(reply.class());
    if disposition == Disposition::Delivered {
        return outcome(reply, disposition, BounceClass::Unclassified, "accepted", "builtin:2xx".to_string(), rules_version.clone());
    }
    let id = format!("builtin:rfc5321:{}xx", reply.class());
    outcome(reply, disposition, BounceClass::Unclassified, "no_enhanced_code", id, rules_version.clone())
}

/// The fallback decision: RFC 3463, then RFC 5321; with the layer that decided.
pub(crate) fn fallback(reply: &Reply, rules_version: &Arc<str>) -> (FallbackLayer, Outcome) {
    match rfc3463(reply, rules_version) {
        Some(o) => (FallbackLayer::Rfc3463, o),
        None => (FallbackLayer::Rfc5321, rfc5321(reply, rules_version)),
    }
}

/// Classification and reason label for an enhanced code (RFC 3463 and the IANA registry).
pub(crate) fn by_enhanced(subject: u16, detail: u16) -> (BounceClass, &'static str) {
    use BounceClass::*;
    match (subject, detail) {
        (1, 1) | (1, 3) | (1, 6) => (InvalidAddress, "bad_mailbox"),
        (1, 2) => (InvalidAddress, "bad_domain"),
        (1, 10) => (InvalidAddress, "null_mx"),
        (1, _) => (InvalidAddress, "address_error"),
        (2, 1) => (MailboxUnavailable, "mailbox_disabled"),
        (2, 2) => (MailboxUnavailable, "mailbox_full"),
        (2, 3) => (Content, "message_too_large"),
        (2, _) => (MailboxUnavailable, "mailbox_error"),
        (3, 4) => (Content, "message_too_large"),
        (3, _) => (Technical, "mail_system"),
        (4, 7) => (Technical, "delivery_expired"),
        (4, _) => (Technical, "network_routing"),
        (5, 3) => (FrequencyOrVolume, "too_many_recipients"),
        (5, _) => (Technical, "protocol"),
        (6, _) => (Content, "media"),
        (7, 1) => (Reputation, "policy_refused"),
        (7, 20..=27) => (Technical, "authentication"),
        (7, 28) => (FrequencyOrVolume, "mail_flood"),
        (7, 13) | (7, 17) => (MailboxUnavailable, "mailbox_disabled"),
        (7, _) => (Unclassified, "security_policy"),
        _ => (Unclassified, "other"),
    }
}

impl Classify for Builtin {
    fn classify(&self, reply: &Reply, _ctx: &Context<'_>) -> Outcome {
        fallback(reply, &version()).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(line: &str) -> Outcome {
        Builtin.classify(&Reply::parse(line).unwrap(), &Context::default())
    }

    #[test]
    fn reply_class_decides_disposition() {
        assert_eq!(classify("250 2.0.0 OK queued").disposition, Disposition::Delivered);
        assert_eq!(classify("451 4.3.0 try later").disposition, Disposition::Retry);
        assert_eq!(classify("421 too busy").disposition, Disposition::Retry);
        assert_eq!(classify("554 no").disposition, Disposition::Bounce);
    }

    #[test]
    fn enhanced_codes_classify_and_only_bad_addresses_are_suppressed() {
        let o = classify("550 5.1.1 user unknown");
        assert_eq!((o.classification, o.suppress), (BounceClass::InvalidAddress, true));
        assert_eq!(o.rule_id, "builtin:rfc3463:x.1.1");
        let o = classify("552 5.2.2 mailbox full");
        assert_eq!((o.classification, o.suppress), (BounceClass::MailboxUnavailable, false));
        let o = classify("550 5.7.1 rejected by policy");
        assert_eq!(o.classification, BounceClass::Reputation);
        let o = classify("452 4.1.1 temporarily odd");
        assert!(!o.suppress, "a retry is never suppressed");
        assert_eq!(classify("554 no").rule_id, "builtin:rfc5321:5xx");
    }
}
