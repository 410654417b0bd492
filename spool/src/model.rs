//! The message model shared by every crate: what the edge accepts and the MTA delivers.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// Milliseconds since the Unix epoch: the spool's clock for due times and leases.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A message id: a ULID, so ids sort by creation time and spool keys stay in arrival order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Ulid);

impl MessageId {
    pub fn new() -> Self {
        MessageId(Ulid::new())
    }
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_bytes()
    }
    pub fn from_bytes(b: [u8; 16]) -> Self {
        MessageId(Ulid::from_bytes(b))
    }
    /// Creation time encoded in the id, in ms since the epoch.
    pub fn timestamp_ms(self) -> u64 {
        self.0.timestamp_ms()
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

impl FromStr for MessageId {
    type Err = ulid::DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(s).map(MessageId)
    }
}

/// Where one recipient stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecipientState {
    /// Not yet delivered; will be tried (again) at the message's due time.
    Pending,
    /// Accepted by the remote server (2xx).
    Delivered,
    /// Permanently failed (5xx, or retries expired); a bounce event was written.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The envelope address (RCPT TO), as given.
    pub address: String,
    pub state: RecipientState,
    /// The last reply the remote server gave for this recipient, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
}

impl Recipient {
    pub fn pending(address: impl Into<String>) -> Self {
        Recipient { address: address.into(), state: RecipientState::Pending, last_reply: None }
    }
}

/// Everything about a message except its body. This is what workers read and rewrite.
///
/// One spool message goes to one destination domain (`queue`): the edge splits a request
/// with recipients at several domains into one message per domain, so each message is
/// delivered over one connection and queues can be paced per destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageMeta {
    pub id: MessageId,
    /// The destination queue: the lower-cased recipient domain.
    pub queue: String,
    /// Who submitted it: `apikey:<name>` or `smtp:<user>` or `net:<client ip>`.
    pub tenant: String,
    /// The envelope sender (MAIL FROM); empty for the null reverse-path.
    pub mail_from: String,
    pub recipients: Vec<Recipient>,
    /// The id returned to the client (`X-Message-Id`); several messages share it when one
    /// request fans out into several.
    pub x_message_id: String,
    /// The Message-ID header, used as `smtp-id` in events.
    #[serde(default)]
    pub smtp_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_args: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_pool: Option<String>,
    /// When the edge accepted it (ms since epoch).
    pub created_at: u64,
    /// When it should next be tried (ms since epoch).
    pub due_at: u64,
    /// When the MTA gives up retrying and bounces what is still pending (ms since epoch).
    pub expires_at: u64,
    /// Delivery attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// Header lines the MTA prepends when delivering (e.g. a DKIM-Signature computed on the
    /// first attempt), kept so retries send exactly the same bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepend_headers: Option<String>,
}

impl MessageMeta {
    pub fn pending_recipients(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients.iter().filter(|r| r.state == RecipientState::Pending)
    }
}

/// A message as enqueued: metadata plus the raw RFC 5322 body (CRLF line endings).
#[derive(Clone, Debug)]
pub struct Message {
    pub meta: MessageMeta,
    pub body: Bytes,
}

impl Message {
    pub fn id(&self) -> MessageId {
        self.meta.id
    }
}
