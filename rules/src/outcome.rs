//! What a classification decides.

use std::fmt;
use std::sync::Arc;
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

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "delivered" => Some(Disposition::Delivered),
            "retry" => Some(Disposition::Retry),
            "bounce" => Some(Disposition::Bounce),
            _ => None,
        }
    }

    /// What the reply class means by itself: 2xx delivered, 4xx retry, 5xx bounce.
    pub fn of_class(class: u8) -> Self {
        match class {
            2 | 3 => Disposition::Delivered,
            4 => Disposition::Retry,
            _ => Disposition::Bounce,
        }
    }
}

impl fmt::Display for Disposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

/// SendGrid's bounce event `type`: `bounce` when the receiver refused the *address* (it does
/// not exist, or its mailbox cannot take mail), `blocked` when it refused the *sender* or the
/// message (reputation, block lists, content, rate or volume) or the two servers could not
/// complete the delivery (a technical failure). Only `bounce`s are ever suppressed: a block
/// says nothing about the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BounceType {
    Bounce,
    Blocked,
}

impl BounceType {
    pub fn as_str(self) -> &'static str {
        match self {
            BounceType::Bounce => "bounce",
            BounceType::Blocked => "blocked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bounce" => Some(BounceType::Bounce),
            "blocked" => Some(BounceType::Blocked),
            _ => None,
        }
    }

    /// The type a classification gives when the rule names none: `Invalid Address` and
    /// `Mailbox Unavailable` are about the address (bounce); `Reputation`, `Content` and
    /// `Frequency or Volume Too High` about the sender (blocked); `Technical` failures are
    /// between the servers, the address may be fine (blocked, as SendGrid reports a domain
    /// whose MX cannot be found); `Unclassified` says nothing, so the reply class decides
    /// (a permanent 5xx is a bounce, a 4xx turned into a failure is blocked).
    pub fn default_for(classification: BounceClass, reply_class: u8) -> Self {
        match classification {
            BounceClass::InvalidAddress | BounceClass::MailboxUnavailable => BounceType::Bounce,
            BounceClass::Reputation | BounceClass::Content | BounceClass::FrequencyOrVolume | BounceClass::Technical => BounceType::Blocked,
            BounceClass::Unclassified if reply_class == 5 => BounceType::Bounce,
            BounceClass::Unclassified => BounceType::Blocked,
        }
    }
}

impl fmt::Display for BounceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Apply a shaping action only once the rule matched `count` times within `window` on the
/// same path: one 421 is noise, twenty in five minutes is a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub count: u32,
    pub window: Duration,
}

/// What the sending path (egress IP × provider) should do after this reply. The rules
/// engine only decides; traffic shaping carries it out (and counts toward `threshold`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShapingAction {
    None,
    /// Slow down to at most `messages_per_minute` and `connections` for `duration`.
    Throttle {
        messages_per_minute: Option<u32>,
        connections: Option<u32>,
        duration: Duration,
        threshold: Option<Threshold>,
    },
    /// Stop sending on the path for `duration`.
    Suspend { duration: Duration, threshold: Option<Threshold> },
}

impl ShapingAction {
    pub fn is_none(&self) -> bool {
        matches!(self, ShapingAction::None)
    }
}

impl fmt::Display for ShapingAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let threshold = |f: &mut fmt::Formatter<'_>, t: &Option<Threshold>| match t {
            Some(t) => write!(f, " after {} matches within {}", t.count, humantime::format_duration(t.window)),
            None => Ok(()),
        };
        match self {
            ShapingAction::None => f.write_str("none"),
            ShapingAction::Throttle { messages_per_minute, connections, duration, threshold: t } => {
                f.write_str("throttle")?;
                if let Some(m) = messages_per_minute {
                    write!(f, " to {m} msg/min")?;
                }
                if let Some(c) = connections {
                    write!(f, ", {c} connections")?;
                }
                write!(f, " for {}", humantime::format_duration(*duration))?;
                threshold(f, t)
            }
            ShapingAction::Suspend { duration, threshold: t } => {
                write!(f, "suspend for {}", humantime::format_duration(*duration))?;
                threshold(f, t)
            }
        }
    }
}

/// The decision for one recipient after one reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub disposition: Disposition,
    pub classification: BounceClass,
    /// A finer label than the classification (`user_unknown`, `rate_limited`, ...).
    pub reason: String,
    /// The bounce event's `type` (only meaningful for bounces).
    pub bounce_type: BounceType,
    /// Add the recipient to the suppression list: only ever true for a permanent (5xx)
    /// bounce of type `bounce`.
    pub suppress: bool,
    /// The id of the rule that decided (stable; appears in events and metrics).
    pub rule_id: String,
    pub shaping: ShapingAction,
    /// The version (content hash) of the rules table that decided; written into events.
    pub rules_version: Arc<str>,
}
