//! What a classification decides.

use std::fmt;
use std::time::Duration;

/// What happens to the recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Disposition {
    Delivered,
    Retry,
    Bounce,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Delivered => "delivered",
            Disposition::Retry => "retry",
            Disposition::Bounce => "bounce",
        }
    }
}

/// SendGrid's `bounce_classification` values (Event Webhook spelling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BounceClass {
    InvalidAddress,
    MailboxUnavailable,
    Technical,
    Content,
    Reputation,
    FrequencyOrVolume,
    Unclassified,
}

impl BounceClass {
    pub const ALL: [BounceClass; 7] = [
        BounceClass::InvalidAddress,
        BounceClass::MailboxUnavailable,
        BounceClass::Technical,
        BounceClass::Content,
        BounceClass::Reputation,
        BounceClass::FrequencyOrVolume,
        BounceClass::Unclassified,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BounceClass::InvalidAddress => "Invalid Address",
            BounceClass::MailboxUnavailable => "Mailbox Unavailable",
            BounceClass::Technical => "Technical",
            BounceClass::Content => "Content",
            BounceClass::Reputation => "Reputation",
            BounceClass::FrequencyOrVolume => "Frequency or Volume Too High",
            BounceClass::Unclassified => "Unclassified",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        BounceClass::ALL.into_iter().find(|c| c.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

impl fmt::Display for BounceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the sending path (egress IP × provider) should do after this reply. The rules
/// engine only decides; traffic shaping carries it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShapingAction {
    None,
    /// Slow down to at most `messages_per_minute` and `connections` for `duration`.
    Throttle { messages_per_minute: Option<u32>, connections: Option<u32>, duration: Duration },
    /// Stop sending on the path for `duration`.
    Suspend { duration: Duration },
}

/// The decision for one recipient after one reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub disposition: Disposition,
    pub classification: BounceClass,
    /// A finer label than the classification (`user_unknown`, `rate_limited`, ...).
    pub reason: String,
    /// Add the recipient to the suppression list (only meaningful for bounces).
    pub suppress: bool,
    /// The id of the rule that decided (stable; appears in events and metrics).
    pub rule_id: String,
    pub shaping: ShapingAction,
}
