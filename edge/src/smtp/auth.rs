//! SMTP AUTH (RFC 4954): the PLAIN and LOGIN exchanges and the credential check.
//!
//! The exchanges are a few lines of base64 framing around SASL; no crate implements the
//! server side of these two mechanisms on its own, so they are written here.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::config::{parse_sha256, SmtpUser, API_KEY_USER};
use crate::ApiKeys;

/// Checks user names and passwords: `apikey` with an API key, or a configured user.
pub(crate) struct Credentials {
    users: HashMap<String, [u8; 32]>,
    api_keys: Arc<ApiKeys>,
}

impl Credentials {
    /// `users` must have passed `SmtpConfig::validate` (their hashes decode).
    pub(crate) fn new(users: &[SmtpUser], api_keys: Arc<ApiKeys>) -> Self {
        let users = users.iter().filter_map(|u| Some((u.name.clone(), parse_sha256(&u.password_sha256)?))).collect();
        Credentials { users, api_keys }
    }

    /// The tenant these credentials authenticate, or `None`.
    pub(crate) fn verify(&self, user: &str, password: &str) -> Option<String> {
        if user == API_KEY_USER {
            return self.api_keys.verify(password).map(|t| format!("apikey:{}", t.name));
        }
        let expected = self.users.get(user)?;
        let presented: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        // Compare every byte so the time taken does not reveal how much of the hash matched.
        let difference = expected.iter().zip(presented.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (difference == 0).then(|| format!("smtp:{user}"))
    }
}

/// The mechanisms the server offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mechanism {
    Plain,
    Login,
}

/// An AUTH exchange waiting for the client's next line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Exchange {
    PlainResponse,
    LoginUser,
    LoginPassword { user: String },
}

/// What the server does next in an AUTH exchange.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AuthStep {
    /// Answer `334 <challenge>` and read the next line for `next`.
    Challenge { challenge: &'static str, next: Exchange },
    /// The client has presented these credentials.
    Credentials { user: String, password: String },
    /// The client's response is not well-formed; the text says why.
    Malformed(&'static str),
}

/// `Username:` and `Password:` in base64, the challenges LOGIN clients expect.
const LOGIN_USER_CHALLENGE: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

impl Exchange {
    /// Starts an exchange, with the optional initial response of the `AUTH` command.
    pub(crate) fn start(mechanism: Mechanism, initial_response: &str) -> AuthStep {
        match (mechanism, initial_response.is_empty()) {
            (Mechanism::Plain, true) => AuthStep::Challenge { challenge: "", next: Exchange::PlainResponse },
            (Mechanism::Login, true) => {
                AuthStep::Challenge { challenge: LOGIN_USER_CHALLENGE, next: Exchange::LoginUser }
            }
            (_, false) => {
                let first = if mechanism == Mechanism::Plain { Exchange::PlainResponse } else { Exchange::LoginUser };
                first.respond(initial_response)
            }
        }
    }

    /// Takes the client's next line (already known not to be the `*` cancellation).
    pub(crate) fn respond(self, line: &str) -> AuthStep {
        match self {
            Exchange::PlainResponse => match decode_plain(line) {
                Ok((user, password)) => AuthStep::Credentials { user, password },
                Err(reason) => AuthStep::Malformed(reason),
            },
            Exchange::LoginUser => match decode_text(line) {
                Ok(user) if !user.is_empty() => {
                    AuthStep::Challenge { challenge: LOGIN_PASSWORD_CHALLENGE, next: Exchange::LoginPassword { user } }
                }
                Ok(_) => AuthStep::Malformed("empty user name"),
                Err(reason) => AuthStep::Malformed(reason),
            },
            Exchange::LoginPassword { user } => match decode_text(line) {
                Ok(password) => AuthStep::Credentials { user, password },
                Err(reason) => AuthStep::Malformed(reason),
            },
        }
    }
}

fn decode_text(b64: &str) -> Result<String, &'static str> {
    let bytes = BASE64.decode(b64.trim()).map_err(|_| "response is not valid base64")?;
    String::from_utf8(bytes).map_err(|_| "response is not UTF-8")
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`. Acting as another identity (an authzid
/// different from the authcid) is not supported.
fn decode_plain(b64: &str) -> Result<(String, String), &'static str> {
    let text = decode_text(b64)?;
    let mut parts = text.split('\0');
    let (Some(authzid), Some(authcid), Some(password), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("PLAIN response must be authzid NUL user NUL password");
    };
    if authcid.is_empty() {
        return Err("empty user name");
    }
    if !authzid.is_empty() && authzid != authcid {
        return Err("authorizing as another identity is not supported");
    }
    Ok((authcid.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{auth::hash_key, ApiKeyConfig};

    fn b64(s: &str) -> String {
        BASE64.encode(s)
    }

    #[test]
    fn plain_with_and_without_initial_response() {
        let creds = AuthStep::Credentials { user: "u".into(), password: "p w".into() };
        assert_eq!(Exchange::start(Mechanism::Plain, &b64("\0u\0p w")), creds);
        assert_eq!(Exchange::start(Mechanism::Plain, &b64("u\0u\0p w")), creds);
        let AuthStep::Challenge { challenge: "", next } = Exchange::start(Mechanism::Plain, "") else { panic!() };
        assert_eq!(next.respond(&b64("\0u\0p w")), creds);
        assert!(matches!(Exchange::start(Mechanism::Plain, "!!"), AuthStep::Malformed(_)));
        assert!(matches!(Exchange::start(Mechanism::Plain, &b64("other\0u\0p")), AuthStep::Malformed(_)));
        assert!(matches!(Exchange::start(Mechanism::Plain, &b64("u\0p")), AuthStep::Malformed(_)));
    }

    #[test]
    fn login_asks_for_user_then_password() {
        let AuthStep::Challenge { challenge, next } = Exchange::start(Mechanism::Login, "") else { panic!() };
        assert_eq!(BASE64.decode(challenge).unwrap(), b"Username:");
        let AuthStep::Challenge { challenge, next } = next.respond(&b64("u")) else { panic!() };
        assert_eq!(BASE64.decode(challenge).unwrap(), b"Password:");
        assert_eq!(next.respond(&b64("pw")), AuthStep::Credentials { user: "u".into(), password: "pw".into() });
        // RFC 4954 allows the user name as initial response.
        let AuthStep::Challenge { next, .. } = Exchange::start(Mechanism::Login, &b64("u")) else { panic!() };
        assert_eq!(next, Exchange::LoginPassword { user: "u".into() });
    }

    #[test]
    fn verifies_api_keys_and_configured_users() {
        let keys = ApiKeys::from_config(&[ApiKeyConfig { name: "acme".into(), sha256: hash_key("SG.key") }]).unwrap();
        let users = [SmtpUser { name: "billing".into(), password_sha256: hash_key("s3cret") }];
        let creds = Credentials::new(&users, Arc::new(keys));
        assert_eq!(creds.verify("apikey", "SG.key").as_deref(), Some("apikey:acme"));
        assert_eq!(creds.verify("billing", "s3cret").as_deref(), Some("smtp:billing"));
        assert_eq!(creds.verify("apikey", "SG.wrong"), None);
        assert_eq!(creds.verify("billing", "S3cret"), None);
        assert_eq!(creds.verify("acme", "SG.key"), None);
        assert_eq!(creds.verify("nobody", "s3cret"), None);
    }
}
