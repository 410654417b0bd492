//! The replies the MTA writes for failures without a reply, made by the very functions the
//! MTA uses (mta/src/synthetic.rs) from real errors where one can be produced here, land on
//! the default table's `sluice.*` rules, in the context the MTA classifies them in — also
//! when the recipient domain or MX host belongs to a provider with rules of its own.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use sluice_mta::dkim::{Decision, DkimConfig, DkimPolicy, Fallback, HeaderFacts, SignError};
use sluice_mta::smtp_client::{ClientError, SmtpClient};
use sluice_mta::synthetic;
use sluice_rules::{BounceType, Classify, Context, Disposition, Engine, Reply, Stage, DEFAULT_TABLE};

/// Recipient domains and the MX host the MTA would have been talking to: unknown ones and
/// providers whose own rules come before the synthetic ones.
const DESTINATIONS: [(&str, &str); 5] = [
    ("example.com", "mx.example.com"),
    ("gmail.com", "gmail-smtp-in.l.google.com"),
    ("yahoo.com", "mta5.am0.yahoodns.net"),
    ("outlook.com", "outlook-com.olc.protection.outlook.com"),
    ("qq.com", "mx1.qq.com"),
];

struct Case {
    reply: Reply,
    stage: Stage,
    /// Whether the MTA had an MX host (connection failures) or not (DNS, DKIM).
    connected: bool,
    rule: &'static str,
    disposition: Disposition,
}

fn case(reply: Reply, stage: Stage, connected: bool, rule: &'static str, disposition: Disposition) -> Case {
    Case { reply, stage, connected, rule, disposition }
}

/// A real "connection refused": a port that was just released.
async fn refused() -> (SocketAddr, ClientError) {
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    match SmtpClient::connect(addr, Duration::from_secs(10)).await {
        Err(e) => (addr, e),
        Ok(_) => panic!("nothing listens on {addr}"),
    }
}

/// The refusal text DKIM policy really gives for a tenant that may not send unsigned mail.
fn dkim_refusal(message: &[u8]) -> String {
    let config = DkimConfig { fallback: Fallback::Refuse, ..DkimConfig::default() };
    config.validate().unwrap();
    match DkimPolicy::from_config(&config).decide("apikey:strict", &HeaderFacts::read(message)) {
        Decision::Refuse(reason) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_mta_s_own_failure_replies_land_on_the_sluice_rules() {
    let engine = Engine::load(vec![DEFAULT_TABLE.into()]).unwrap_or_else(|e| panic!("{e}"));
    let (addr, refused) = refused().await;
    assert!(matches!(refused, ClientError::Io(_)), "{refused:?}");
    let host = "mx.example.com";
    let tls = ClientError::Tls(io::Error::new(io::ErrorKind::InvalidData, "invalid peer certificate: UnknownIssuer"));
    let reset = ClientError::Io(io::Error::from(io::ErrorKind::ConnectionReset));
    let starttls_no = Reply::parse("454 4.7.0 TLS not available due to local problem").unwrap();
    use Disposition::{Bounce, Retry};
    let cases = [
        case(synthetic::connect_failed(host, addr, &refused), Stage::Connect, true, "sluice.connect_failed", Retry),
        case(synthetic::client_failure(&ClientError::Timeout(Duration::from_secs(300)), host, "the greeting"), Stage::Connect, true, "sluice.timeout", Retry),
        case(synthetic::client_failure(&ClientError::Timeout(Duration::from_millis(2500)), host, "RCPT TO"), Stage::Rcpt, true, "sluice.timeout", Retry),
        case(synthetic::client_failure(&ClientError::Closed, host, "DATA"), Stage::Data, true, "sluice.connection_lost", Retry),
        case(synthetic::client_failure(&reset, host, "MAIL FROM"), Stage::Mail, true, "sluice.connection_lost", Retry),
        case(synthetic::no_final_reply(), Stage::EndOfData, true, "sluice.connection_lost", Retry),
        case(synthetic::client_failure(&ClientError::Malformed("line too long".into()), host, "EHLO"), Stage::Ehlo, true, "sluice.malformed_reply", Retry),
        case(synthetic::client_failure(&tls, host, "the TLS handshake"), Stage::StartTls, true, "sluice.tls_failed", Retry),
        case(synthetic::invalid_tls_name("mx_1.example.com"), Stage::StartTls, true, "sluice.tls_failed", Retry),
        case(synthetic::starttls_refused(host, &starttls_no), Stage::StartTls, true, "sluice.tls_failed", Retry),
        case(synthetic::starttls_missing(host), Stage::StartTls, true, "sluice.tls_failed", Retry),
        case(synthetic::smtputf8_unsupported(host), Stage::Mail, true, "sluice.smtputf8_unsupported", Bounce),
        case(synthetic::too_large(31_457_280, 26_214_400, host), Stage::Mail, true, "sluice.size_exceeded", Bounce),
        case(synthetic::no_host(), Stage::Connect, false, "sluice.no_host", Retry),
        case(synthetic::rset_refused(host), Stage::Mail, true, "sluice.connection_lost", Retry),
        case(synthetic::broke_before_tried(), Stage::Mail, true, "sluice.connection_lost", Retry),
        case(synthetic::rate_not_allowed(), Stage::Mail, true, "sluice.rate_not_allowed", Retry),
        case(synthetic::expired_in_queue(72.0), Stage::Connect, false, "sluice.expired_in_queue", Retry),
        case(synthetic::dns_failure("example.com", "MX", "no answer within 10s"), Stage::Connect, false, "sluice.dns_failure", Retry),
        case(synthetic::dns_failure("mx.example.com", "A/AAAA", "request timed out"), Stage::Connect, false, "sluice.dns_failure", Retry),
        case(synthetic::nxdomain("example.invalid"), Stage::Connect, false, "sluice.domain_not_found", Bounce),
        case(synthetic::invalid_address_literal("[300.1.2.3]"), Stage::Connect, false, "sluice.domain_not_found", Bounce),
        case(synthetic::null_mx("example.com"), Stage::Connect, false, "sluice.null_mx", Bounce),
        case(synthetic::no_address("mx.example.com", false), Stage::Connect, false, "sluice.mx_host_unresolvable", Bounce),
        case(synthetic::no_address("mx.example.com", true), Stage::Connect, false, "sluice.mx_host_unresolvable", Bounce),
        case(synthetic::dkim_refused(&dkim_refusal(b"From: News <news@unsigned.example>\r\nSubject: s\r\n\r\nb\r\n")), Stage::Data, false, "sluice.dkim_refused", Bounce),
        case(synthetic::dkim_refused(&dkim_refusal(b"Subject: no from\r\n\r\nb\r\n")), Stage::Data, false, "sluice.dkim_refused", Bounce),
        case(synthetic::dkim_failed(SignError::NoKey("example.com".into())), Stage::Data, false, "sluice.dkim_failed", Retry),
        case(
            synthetic::dkim_failed(SignError::Crypto { domain: "example.com".into(), selector: "s1".into(), reason: "the key was rejected".into() }),
            Stage::Data,
            false,
            "sluice.dkim_failed",
            Retry,
        ),
        case(synthetic::dkim_interrupted(), Stage::Data, false, "sluice.dkim_failed", Retry),
    ];
    for c in &cases {
        assert!(c.reply.synthetic, "{}", c.reply);
        for (domain, mx) in DESTINATIONS {
            // The MTA knows the MX host only when it got as far as connecting.
            let mx_host = c.connected.then_some(mx);
            let ctx = Context { stage: Some(c.stage), mx_host, domain: Some(domain) };
            let o = engine.classify(&c.reply, &ctx);
            assert_eq!(o.rule_id, c.rule, "{} to {domain} via {mx_host:?}", c.reply);
            assert_eq!(o.disposition, c.disposition, "{}", c.reply);
        }
    }
    // Local refusals are no verdict on the sender's reputation: Technical, never suppressed.
    for c in cases.iter().filter(|c| c.rule.starts_with("sluice.dkim")) {
        let o = engine.classify(&c.reply, &Context { stage: Some(c.stage), mx_host: None, domain: Some("example.com") });
        assert_eq!(o.classification, sluice_rules::BounceClass::Technical, "{}", c.reply);
        assert!(!o.suppress);
        if o.disposition == Bounce {
            assert_eq!(o.bounce_type, BounceType::Blocked);
        }
    }
}
