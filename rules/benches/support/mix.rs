//! The reply mix of the `classify` bench, shared with the `classify_count` example (which
//! counts instructions under callgrind): what a bulk sender sees, with the provider context
//! (MX host, domain, stage) the MTA passes.

use sluice_rules::{Reply, Stage};

pub struct Case {
    pub reply: Reply,
    pub mx: &'static str,
    pub domain: &'static str,
    pub stage: Stage,
}

fn case(weight: usize, mx: &'static str, domain: &'static str, stage: Stage, reply: &str) -> Vec<Case> {
    (0..weight).map(|_| Case { reply: Reply::parse(reply).unwrap(), mx, domain, stage }).collect()
}

/// 100 replies: 80 delivered, 8 deferred, 12 bounced.
pub fn mix() -> Vec<Case> {
    use Stage::*;
    let mut v = Vec::new();
    v.extend(case(30, "gmail-smtp-in.l.google.com", "gmail.com", EndOfData, "250 2.0.0 OK  1705000000 a1si1234567wrx.123 - gsmtp"));
    v.extend(case(20, "mta7.am0.yahoodns.net", "yahoo.com", EndOfData, "250 ok dirdel"));
    v.extend(case(15, "hotmail-com.olc.protection.outlook.com", "hotmail.com", EndOfData, "250 2.6.0 <id@example.net> [InternalId=1234, Hostname=DM6PR.prod.outlook.com] 12345 bytes in 0.123, 100.000 KB/sec Queued mail for delivery"));
    v.extend(case(15, "mx.company.example", "company.example", EndOfData, "250 2.0.0 Ok: queued as 4XyZ1234"));
    v.extend(case(3, "mta7.am0.yahoodns.net", "yahoo.com", Connect, "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"));
    v.extend(case(2, "gmail-smtp-in.l.google.com", "gmail.com", Rcpt, "452-4.2.2 The email account that you tried to reach is over quota. Please direct\n452 4.2.2 the recipient to https://support.google.com/mail/?p=OverQuotaTemp x12si98 - gsmtp"));
    v.extend(case(2, "outlook-com.olc.protection.outlook.com", "outlook.com", Rcpt, "451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation. For e-mail delivery information, see https://postmaster.live.com (S775)"));
    v.extend(case(1, "mx.greylist.example", "greylist.example", Rcpt, "450 4.2.0 <a@greylist.example>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/greylist.example.html"));
    v.extend(case(4, "gmail-smtp-in.l.google.com", "gmail.com", Rcpt, "550-5.1.1 The email account that you tried to reach does not exist. Please try\n550-5.1.1 double-checking the recipient's email address for typos or\n550-5.1.1 unnecessary spaces. Learn more at\n550 5.1.1  https://support.google.com/mail/?p=NoSuchUser q12si8172031wrp.389 - gsmtp"));
    v.extend(case(2, "mta6.am0.yahoodns.net", "yahoo.com", Rcpt, "554 delivery error: dd This user doesn't have a yahoo.com account (x@yahoo.com) [0] - mta1271.mail.bf1.yahoo.com"));
    v.extend(case(2, "mx.company.example", "company.example", Rcpt, "550 5.1.1 <jdoe@company.example>: Recipient address rejected: User unknown in virtual mailbox table"));
    v.extend(case(1, "hotmail-com.olc.protection.outlook.com", "hotmail.com", Mail, "550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150). You can also refer your provider to http://mail.live.com/mail/troubleshooting.aspx#errors."));
    v.extend(case(1, "mx.smallbiz.example", "smallbiz.example", Rcpt, "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1"));
    v.extend(case(1, "mxs.mail.ru", "mail.ru", EndOfData, "550 spam message rejected. Please visit http://help.mail.ru/notspam-support/id?c=QWERTY or report details to abuse@corp.mail.ru. Error code: 1234ABCD. ID: 00000000A1B2C3D4."));
    v.extend(case(1, "mx.strict.example", "strict.example", EndOfData, "550 5.7.1 Message rejected because of unacceptable content."));
    assert_eq!(v.len(), 100);
    v
}
