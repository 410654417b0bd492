//! The shipped default table compiles, every example passes, and it covers every provider the
//! table format promises.

use sluice_rules::{compile, default_sources};

#[test]
fn default_table_compiles_and_every_example_passes() {
    let table = compile(&default_sources()).unwrap_or_else(|e| panic!("{e}"));
    assert!(table.rules().len() > 100, "a thorough table: {} rules", table.rules().len());
    assert!(table.rules().iter().all(|r| !r.examples.is_empty() && !r.description.is_empty()));
    assert!(table.shadowed().is_empty());
}

#[test]
fn default_table_defines_the_providers_shaping_needs() {
    let table = compile(&default_sources()).unwrap();
    let ids: Vec<&str> = table.providers().list().iter().map(|p| p.id.as_str()).collect();
    for want in [
        "google", "yahoo", "microsoft", "apple", "comcast", "att", "united-internet", "orange", "mailru", "yandex", "qq", "netease",
        "proofpoint", "mimecast", "barracuda", "cisco",
    ] {
        assert!(ids.contains(&want), "provider {want} missing from {ids:?}");
        assert!(table.rules().iter().any(|r| r.provider.is_some_and(|p| table.providers().get(p).id == want)
            || r.description.to_lowercase().contains(&want.replace('-', " "))), "no rule for {want}");
    }
}

/// A URL of a public page, an RFC, or (for sluice's own replies) the source file that makes
/// the reply.
fn names_a_source(description: &str, id: &str) -> bool {
    let url = description.split_whitespace().any(|w| (w.starts_with("http://") || w.starts_with("https://")) && w.len() > 12);
    let rfc = description.split("RFC ").skip(1).any(|rest| rest.chars().next().is_some_and(|c| c.is_ascii_digit()));
    let source_file = id.starts_with("sluice.") && description.contains("mta/src/");
    url || rfc || source_file
}

#[test]
fn every_default_rule_outside_the_generic_wording_names_its_source() {
    let table = compile(&default_sources()).unwrap();
    let missing: Vec<String> = table
        .rules()
        .iter()
        .filter(|r| !r.location.file.ends_with("90-generic.toml"))
        .filter(|r| !names_a_source(&r.description, &r.id))
        .map(|r| format!("{} ({})", r.id, r.location))
        .collect();
    assert!(missing.is_empty(), "rules without a URL, RFC or source file in their description: {missing:#?}");
    assert!(names_a_source("see https://example.com/x", "a") && names_a_source("RFC 3463 section 3", "a"));
    assert!(!names_a_source("example.com/page", "a") && !names_a_source("RFC text", "a") && !names_a_source("mta/src/x.rs", "a"));
}

/// A real reply of each provider, gateway and block list the table promises, and the rule
/// family that must decide it.
#[test]
fn replies_of_every_named_provider_gateway_and_block_list_reach_their_rules() {
    use sluice_rules::{Classify, Context, Reply, Stage};
    let table = compile(&default_sources()).unwrap();
    let cases: &[(&str, Option<&str>, &str, &str)] = &[
        ("google.", Some("gmail-smtp-in.l.google.com"), "gmail.com", "550-5.1.1 The email account that you tried to reach does not exist.\n550 5.1.1 https://support.google.com/mail/?p=NoSuchUser a1si1 - gsmtp"),
        ("yahoo.", Some("mta5.am0.yahoodns.net"), "yahoo.com", "421 4.7.0 [TS02] Temporarily deferred"),
        ("yahoo.", Some("mx-aol.mail.gm0.yahoodns.net"), "aol.com", "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"),
        ("microsoft.", Some("hotmail-com.olc.protection.outlook.com"), "hotmail.com", "550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3140). You can also refer your provider to http://mail.live.com/mail/troubleshooting.aspx#errors."),
        ("microsoft.", Some("example-com.mail.protection.outlook.com"), "example.com", "550 5.7.606 Access denied, banned sending IP [192.0.2.1]. To request removal from this list please visit https://sender.office.com/ and follow the directions."),
        ("apple.", Some("mx01.mail.icloud.com"), "icloud.com", "550 5.1.1 <someone@icloud.com>: user does not exist"),
        ("comcast.", Some("mx1.comcast.net"), "comcast.net", "554 resimta-po-37v.sys.comcast.net comcast 192.0.2.1 found on one or more DNSBLs, see http://postmaster.comcast.net/smtp-error-codes.php#BL000001"),
        ("att.", None, "att.net", "553 5.3.0 flpd595 DNSBL:RBL 521< 192.0.2.1 >_is_blocked.For assistance forward this error to abuse_rbl@abuse-att.net"),
        ("verizon.", None, "verizon.net", "550 5.7.1 Email from 192.0.2.1 is currently blocked by Verizon Online's anti-spam system. The email sender or Email Service Provider may visit http://www.verizon.net/whitelist and request removal of the block. 100722"),
        ("mailru.", Some("mxs.mail.ru"), "mail.ru", "550 spam message rejected. Please visit http://help.mail.ru/notspam-support/id?c=X or report details to abuse@corp.mail.ru. Error code: 1. ID: 2."),
        ("yandex.", Some("mx.yandex.ru"), "yandex.ru", "554 5.7.1 [2] Message rejected under suspicion of SPAM; https://ya.cc/1IrBc 1700000000-abcdEFGH"),
        ("qq.", Some("mx3.qq.com"), "qq.com", "550 Mailbox not found. http://service.exmail.qq.com/cgi-bin/help?subtype=1&&id=20022&&no=1000728"),
        ("netease.", Some("163mx01.mxmail.netease.com"), "163.com", "451 DT:SPM 163 smtp14,EsCowADX3+5B2Vxlc7oFBw--.1 1700000000, please try again"),
        ("proofpoint.", None, "example.com", "554 5.7.0 Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.1"),
        ("mimecast.", Some("eu-smtp-inbound-1.mimecast.com"), "example.com", "550 Envelope blocked - User Entry - https://community.mimecast.com/docs/DOC-1369#550 [a-1.eu123]"),
        ("barracuda.", None, "example.com", "554 Service unavailable; Client host [192.0.2.1] blocked using Barracuda Reputation; http://www.barracudanetworks.com/reputation/?r=1&ip=192.0.2.1"),
        ("cisco.", None, "example.com", "554 Your access to this mail system has been rejected due to the sending MTA's poor reputation. If you believe that this failure is in error, please contact the intended recipient via alternate means."),
        ("blocklist.spamhaus", None, "example.com", "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1"),
        ("blocklist.spamcop", None, "example.com", "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using bl.spamcop.net; Blocked - see https://www.spamcop.net/bl.shtml?192.0.2.1"),
        ("barracuda.reputation", None, "example.com", "554 Refused. Your IP address is listed in the RBL at b.barracudacentral.org"),
    ];
    for (family, mx, domain, reply) in cases {
        let r = Reply::parse(reply).unwrap();
        let mx = mx.map(|m| m.to_string()).unwrap_or_else(|| format!("mx.{domain}"));
        let o = table.classify(&r, &Context { stage: Some(Stage::Rcpt), mx_host: Some(&mx), domain: Some(domain) });
        assert!(o.rule_id.starts_with(family), "{reply:?} via {mx} was decided by {}, not a {family}* rule", o.rule_id);
    }
}

#[test]
fn block_lists_are_blocks_and_unknown_users_bounces() {
    use sluice_rules::{BounceType, Classify, Context, Disposition, Reply, Stage};
    let table = compile(&default_sources()).unwrap();
    let ctx = Context { stage: Some(Stage::Rcpt), mx_host: Some("mx.smallbiz.example"), domain: Some("smallbiz.example") };
    let o = table.classify(&Reply::parse("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1").unwrap(), &ctx);
    assert_eq!((o.rule_id.as_str(), o.disposition, o.bounce_type, o.suppress), ("blocklist.spamhaus", Disposition::Bounce, BounceType::Blocked, false));
    let o = table.classify(&Reply::parse("550 5.1.1 <jdoe@smallbiz.example>: Recipient address rejected: User unknown in virtual mailbox table").unwrap(), &ctx);
    assert_eq!((o.rule_id.as_str(), o.disposition, o.bounce_type, o.suppress), ("generic.user_unknown", Disposition::Bounce, BounceType::Bounce, true));
    // a temporary refusal that a rule turns into a bounce (Yahoo TS03) is a block, never suppressed
    let yahoo = Context { stage: Some(Stage::Connect), mx_host: Some("mta5.am0.yahoodns.net"), domain: Some("yahoo.com") };
    let o = table.classify(&Reply::parse("421 4.7.1 [TS03] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed.").unwrap(), &yahoo);
    assert_eq!((o.disposition, o.bounce_type, o.suppress), (Disposition::Bounce, BounceType::Blocked, false));
}
