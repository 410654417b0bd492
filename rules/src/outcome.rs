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
    /// Add the recipient to the suppression list (only meaningful for bounces).
    pub suppress: bool,
    /// The id of the rule that decided (stable; appears in events and metrics).
    pub rule_id: String,
    pub shaping: ShapingAction,
    /// The version (content hash) of the rules table that decided; written into events.
    pub rules_version: Arc<str>,
}
