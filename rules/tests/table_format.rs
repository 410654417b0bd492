//! The table format, one match feature at a time, and what a broken table reports.

use sluice_rules::{compile, BounceClass, BounceType, Classify, Context, Disposition, Reply, ShapingAction, Source, Stage, Table, Threshold};
use std::time::Duration;

const PROVIDERS: &str = r#"
[[provider]]
id = "bigmail"
mx_suffixes = ["bigmail-mx.net"]
domain_suffixes = ["bigmail.com"]
"#;

fn table(rules: &str) -> Table {
    compile(&[Source::new("providers.toml", PROVIDERS), Source::new("rules.toml", rules)]).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(rules: &str) -> String {
    match compile(&[Source::new("providers.toml", PROVIDERS), Source::new("rules.toml", rules)]) {
        Ok(_) => panic!("expected the table to be rejected"),
        Err(e) => e.to_string(),
    }
}

fn rule_for(t: &Table, reply: &str, ctx: Context<'_>) -> String {
    t.classify(&Reply::parse(reply).unwrap(), &ctx).rule_id
}

fn none() -> Context<'static> {
    Context::default()
}

#[test]
fn exact_code_and_class() {
    let t = table(
        r#"
[[rule]]
id = "exact"
description = "d"
code = "421"
classification = "Technical"
reason = "x"
examples = ["421 bye"]

[[rule]]
id = "class"
description = "d"
code = ["4xx", "554"]
classification = "Technical"
reason = "y"
examples = ["450 later", "554 no"]
"#,
    );
    assert_eq!(rule_for(&t, "421 closing", none()), "exact");
    assert_eq!(rule_for(&t, "451 later", none()), "class");
    assert_eq!(rule_for(&t, "554 no", none()), "class");
    assert!(rule_for(&t, "550 no", none()).starts_with("builtin:"));
}

#[test]
fn enhanced_codes_with_three_digit_details_ranges_and_wildcards() {
    let t = table(
        r#"
[[rule]]
id = "ms-banned"
description = "d"
enhanced = "5.7.606-649"
classification = "Reputation"
reason = "banned"
examples = ["550 5.7.606 Access denied, banned sending IP [192.0.2.1]"]

[[rule]]
id = "any-4.7"
description = "d"
enhanced = "4.7.*"
classification = "Reputation"
reason = "soft"
examples = ["421 4.7.650 rate limited"]
"#,
    );
    assert_eq!(rule_for(&t, "550 5.7.649 banned", none()), "ms-banned");
    assert!(rule_for(&t, "550 5.7.650 x", none()).starts_with("builtin:rfc3463"), "outside the range");
    assert_eq!(rule_for(&t, "451 4.7.1 later", none()), "any-4.7");
    assert!(rule_for(&t, "451 later", none()).starts_with("builtin:rfc5321"), "no enhanced code: no match");
}

#[test]
fn text_is_case_insensitive_by_default_on_normalized_multi_line_text() {
    let t = table(
        r#"
[[rule]]
id = "joined"
description = "d"
text = "does not exist\\. please try double-checking"
classification = "Invalid Address"
reason = "user_unknown"
examples = ["550-5.1.1 The account does not exist. Please try\n550 5.1.1 double-checking the address"]

[[rule]]
id = "exact-case"
description = "d"
code = "250"
text = "^OK$"
case_sensitive = true
classification = "Unclassified"
reason = "ok"
examples = ["250 OK"]
"#,
    );
    // continuation prefixes ("550-5.1.1 ") are removed and the lines joined with one space
    let multi = Reply::from_lines(["550-5.1.1 The account DOES NOT EXIST. Please try", "550 5.1.1 double-checking the address"]).unwrap();
    assert_eq!(t.classify(&multi, &none()).rule_id, "joined");
    assert_eq!(rule_for(&t, "250 OK", none()), "exact-case");
    assert!(rule_for(&t, "250 ok", none()).starts_with("builtin:"), "case_sensitive = true");
    // a rule without a code never matches a positive reply
    assert!(rule_for(&t, "250 The account does not exist. Please try double-checking", none()).starts_with("builtin:"));
}

#[test]
fn provider_scope_by_mx_suffix_or_recipient_domain() {
    let t = table(
        r#"
[[rule]]
id = "bigmail-full"
description = "d"
provider = "bigmail"
text = "full"
classification = "Mailbox Unavailable"
reason = "mailbox_full"
examples = ["452 box full"]

[[rule]]
id = "anyone-full"
description = "d"
text = "full"
classification = "Mailbox Unavailable"
reason = "mailbox_full_generic"
examples = [{ reply = "452 box full", domain = "elsewhere.example" }]
"#,
    );
    let by_mx = Context { mx_host: Some("in1.BigMail-MX.net."), ..none() };
    let by_domain = Context { domain: Some("bigmail.com"), ..none() };
    let other = Context { mx_host: Some("mx.other.example"), domain: Some("other.example"), ..none() };
    assert_eq!(rule_for(&t, "452 box full", by_mx), "bigmail-full");
    assert_eq!(rule_for(&t, "452 box full", by_domain), "bigmail-full");
    assert_eq!(rule_for(&t, "452 box full", other), "anyone-full");
    // the MX decides when both are known (a hosted domain with the provider's MX)
    let hosted = Context { mx_host: Some("mx1.bigmail-mx.net"), domain: Some("company.example"), ..none() };
    assert_eq!(rule_for(&t, "452 box full", hosted), "bigmail-full");
}

#[test]
fn stage_scope() {
    let t = table(
        r#"
[[rule]]
id = "greeting"
description = "d"
code = "554"
stage = ["connect", "ehlo"]
classification = "Reputation"
reason = "refused_at_connect"
examples = ["554 go away"]
"#,
    );
    assert_eq!(rule_for(&t, "554 no", Context { stage: Some(Stage::Connect), ..none() }), "greeting");
    assert!(rule_for(&t, "554 no", Context { stage: Some(Stage::Rcpt), ..none() }).starts_with("builtin:"));
    assert!(rule_for(&t, "554 no", none()).starts_with("builtin:"), "no stage known: a stage-scoped rule does not match");
}

#[test]
fn result_fields_disposition_suppress_and_shaping() {
    let t = table(
        r#"
[[rule]]
id = "qq-freq"
description = "a 5xx that is really temporary"
code = "550"
text = "frequency limited"
classification = "Frequency or Volume Too High"
reason = "rate_limited"
disposition = "retry"
shaping = { action = "throttle", messages_per_minute = 30, connections = 1, duration = "1h", threshold = { count = 5, window = "10m" } }
examples = ["550 Ip frequency limited"]

[[rule]]
id = "gone"
description = "d"
code = "5xx"
text = "gone"
classification = "Invalid Address"
reason = "user_unknown"
suppress = true
shaping = { action = "suspend", duration = "30m" }
examples = ["550 user gone"]

[[rule]]
id = "gone-soft"
description = "same text, a 4xx: never suppressed (a suppressing rule may not match it)"
code = "4xx"
text = "gone"
classification = "Invalid Address"
reason = "user_unknown"
examples = ["450 user gone"]
"#,
    );
    let o = t.classify(&Reply::parse("550 Ip frequency limited").unwrap(), &none());
    assert_eq!((o.disposition, o.classification, o.reason.as_str()), (Disposition::Retry, BounceClass::FrequencyOrVolume, "rate_limited"));
    assert_eq!(
        o.shaping,
        ShapingAction::Throttle {
            messages_per_minute: Some(30),
            connections: Some(1),
            duration: Duration::from_secs(3600),
            threshold: Some(Threshold { count: 5, window: Duration::from_secs(600) }),
        }
    );
    let o = t.classify(&Reply::parse("550 user gone").unwrap(), &none());
    assert!(o.suppress && o.disposition == Disposition::Bounce);
    assert_eq!(o.shaping, ShapingAction::Suspend { duration: Duration::from_secs(1800), threshold: None });
    assert_eq!(&*o.rules_version, &**t.version());
    let o = t.classify(&Reply::parse("450 user gone").unwrap(), &none());
    assert_eq!((o.rule_id.as_str(), o.disposition, o.suppress), ("gone-soft", Disposition::Retry, false));
}

#[test]
fn bounce_type_follows_the_classification_unless_the_rule_names_one() {
    let t = table(
        r#"
[[rule]]
id = "listed"
description = "d"
text = "listed"
classification = "Reputation"
reason = "ip_blocklisted"
examples = ["554 5.7.1 listed"]

[[rule]]
id = "unknown-user"
description = "d"
code = "5xx"
enhanced = "5.1.1"
classification = "Invalid Address"
reason = "user_unknown"
suppress = true
examples = ["550 5.1.1 no such user"]

[[rule]]
id = "no-mx"
description = "d"
text = "no mx"
classification = "Technical"
reason = "mx_unresolvable"
examples = ["550 5.4.4 no mx"]

[[rule]]
id = "closed-by-policy"
description = "an account closed by its owner's policy: about the address, whatever the wording"
text = "account closed by policy"
classification = "Reputation"
reason = "closed"
type = "bounce"
examples = ["550 5.7.1 account closed by policy"]
"#,
    );
    let kind = |reply: &str| {
        let o = t.classify(&Reply::parse(reply).unwrap(), &none());
        (o.rule_id, o.bounce_type, o.suppress)
    };
    assert_eq!(kind("554 5.7.1 listed"), ("listed".into(), BounceType::Blocked, false));
    assert_eq!(kind("550 5.1.1 no such user"), ("unknown-user".into(), BounceType::Bounce, true));
    assert_eq!(kind("550 5.4.4 no mx"), ("no-mx".into(), BounceType::Blocked, false));
    assert_eq!(kind("550 5.7.1 account closed by policy"), ("closed-by-policy".into(), BounceType::Bounce, false));
    // the fallback layers: by classification too, Unclassified by the reply class
    assert_eq!(kind("550 5.7.1 go away"), ("builtin:rfc3463:x.7.1".into(), BounceType::Blocked, false));
    assert_eq!(kind("550 5.1.2 no such domain"), ("builtin:rfc3463:x.1.2".into(), BounceType::Bounce, true));
    assert_eq!(kind("554 no"), ("builtin:rfc5321:5xx".into(), BounceType::Bounce, false));
    assert_eq!(BounceType::default_for(BounceClass::Unclassified, 4), BounceType::Blocked);
    assert_eq!(BounceType::default_for(BounceClass::MailboxUnavailable, 5), BounceType::Bounce);
    assert_eq!(BounceType::default_for(BounceClass::FrequencyOrVolume, 5), BounceType::Blocked);
    assert_eq!(BounceType::default_for(BounceClass::Content, 5), BounceType::Blocked);
}

#[test]
fn only_permanent_address_level_bounces_may_be_suppressed() {
    let rule = |extra: &str| format!("[[rule]]\nid = \"s\"\ndescription = \"d\"\n{extra}\nsuppress = true\nexamples = [\"550 5.1.1 gone\"]\n");
    // no code: the rule could match a 4xx
    let e = errors(&rule("text = \"gone\"\nclassification = \"Invalid Address\"\nreason = \"x\""));
    assert!(e.contains("rules.toml:1: rule \"s\": suppress = true on a rule that can match a 4xx reply"), "{e}");
    // a 4xx code among the codes: reported where the code is
    let e = errors(&rule("code = [\"550\", \"450\"]\nclassification = \"Invalid Address\"\nreason = \"x\""));
    assert!(e.contains("rules.toml:4: rule \"s\": suppress = true on a rule that can match a 4xx reply"), "{e}");
    let e = errors(&rule("code = \"4xx\"\nclassification = \"Invalid Address\"\nreason = \"x\""));
    assert!(e.contains("can match a 4xx reply"), "{e}");
    // a block by classification, or by its type
    let e = errors(&rule("code = \"5xx\"\nclassification = \"Reputation\"\nreason = \"x\""));
    assert!(e.contains("rules.toml:1: rule \"s\": suppress = true on a rule whose bounces are of type \"blocked\""), "{e}");
    let e = errors(&rule("code = \"5xx\"\nclassification = \"Invalid Address\"\nreason = \"x\"\ntype = \"blocked\""));
    assert!(e.contains("of type \"blocked\""), "{e}");
    let e = errors(&rule("code = \"5xx\"\nclassification = \"Invalid Address\"\nreason = \"x\"\ntype = \"soft\""));
    assert!(e.contains("rules.toml:7: rule \"s\": unknown type \"soft\""), "{e}");
    // a 5xx address-level rule is fine, also a Reputation one explicitly typed "bounce"
    table(&rule("code = \"5xx\"\nclassification = \"Invalid Address\"\nreason = \"x\""));
    table(&rule("code = [\"550\", \"553\"]\nclassification = \"Reputation\"\nreason = \"x\"\ntype = \"bounce\""));
}

#[test]
fn first_match_wins_across_files_and_fallback_layers_come_last() {
    let t = compile(&[
        Source::new("a.toml", "[[rule]]\nid = \"first\"\ndescription = \"d\"\ncode = \"550\"\ntext = \"x\"\nclassification = \"Content\"\nreason = \"a\"\nexamples = [\"550 x\"]\n"),
        Source::new("b.toml", "[[rule]]\nid = \"second\"\ndescription = \"d\"\ncode = \"5xx\"\ntext = \"x|y\"\nclassification = \"Reputation\"\nreason = \"b\"\nexamples = [\"551 x\", \"550 y\"]\n"),
    ])
    .unwrap();
    assert_eq!(rule_for(&t, "550 x", none()), "first");
    assert_eq!(rule_for(&t, "550 y", none()), "second");
    let o = t.classify(&Reply::parse("550 5.1.1 zzz").unwrap(), &none());
    assert_eq!((o.rule_id.as_str(), o.classification), ("builtin:rfc3463:x.1.1", BounceClass::InvalidAddress));
    assert_eq!(rule_for(&t, "550 zzz", none()), "builtin:rfc5321:5xx");
    // explain agrees with classify and names the runner-up
    let ex = t.explain(&Reply::parse("550 x").unwrap(), &none());
    assert_eq!(ex.winner.outcome.rule_id, "first");
    assert_eq!(ex.runner_up.unwrap().outcome.rule_id, "second");
}

#[test]
fn synthetic_connection_failures_go_through_the_same_table() {
    let t = table(
        r#"
[[rule]]
id = "refused"
description = "d"
code = "421"
enhanced = "4.4.1"
text = "^cannot connect"
classification = "Technical"
reason = "connection_failed"
examples = ["421 4.4.1 cannot connect to mx.example.com [192.0.2.1:25]: Connection refused"]
"#,
    );
    let r = Reply::synthetic(421, "4.4.1".parse().unwrap(), "cannot connect to mx.example.com [192.0.2.1:25]: timed out");
    assert_eq!(t.classify(&r, &none()).rule_id, "refused");
}

#[test]
fn errors_name_file_line_and_reason() {
    let e = errors("[[rule]]\nid = \"bad-regex\"\ndescription = \"d\"\ntext = \"(unclosed\"\nclassification = \"Content\"\nreason = \"x\"\nexamples = [\"550 x\"]\n");
    assert!(e.contains("rules.toml:4: rule \"bad-regex\": text is not a valid regular expression"), "{e}");
    let e = errors("[[rule]]\nid = \"x\"\ndescription = \"d\"\ncode = \"55\"\nclassification = \"Content\"\nreason = \"x\"\nexamples = [\"550 x\"]\n");
    assert!(e.contains("rules.toml:4:") && e.contains("reply code \"55\""), "{e}");
    let e = errors("[[rule]]\nid = \"x\"\ndescription = \"d\"\nenhanced = \"5.1\"\nclassification = \"Content\"\nreason = \"x\"\nexamples = [\"550 x\"]\n");
    assert!(e.contains("rules.toml:4:") && e.contains("enhanced code pattern"), "{e}");
    let e = errors("[[rule]]\nid = \"x\"\ndescription = \"d\"\ncode = \"550\"\nprovider = \"nope\"\nclassification = \"Content\"\nreason = \"x\"\nexamples = [\"550 x\"]\n");
    assert!(e.contains("rules.toml:5:") && e.contains("unknown provider \"nope\""), "{e}");
    let e = errors("[[rule]]\nid = \"x\"\ndescription = \"d\"\ncode = \"550\"\nclassification = \"Spam\"\nreason = \"x\"\nexamples = [\"550 x\"]\n");
    assert!(e.contains("rules.toml:5:") && e.contains("unknown classification \"Spam\""), "{e}");
    let e = errors("[[rule]]\nid = \"x\"\ndescription = \"d\"\ncode = \"550\"\nclassification = \"Content\"\nreason = \"x\"\n");
    assert!(e.contains("needs examples"), "{e}");
    let e = errors("[[rule]]\nid = \"x\"\ndescription = \"d\"\ncode = \"550\"\nclassification = \"Content\"\nreason = \"x\"\nexamples = [\"450 later\"]\n");
    assert!(e.contains("rules.toml:7:") && e.contains("example \"450 later\" is classified by \"builtin:rfc5321:4xx\" instead"), "{e}");
    let e = errors("[[rule]]\nid = \"x\"\ndescription = \"d\"\ncode = \"550\"\nclassification = \"Content\"\nreason = \"x\"\nunknown_key = 1\nexamples = [\"550 x\"]\n");
    assert!(e.contains("rules.toml:7:") && e.contains("unknown field"), "{e}");
    let e = errors("[[rule]\nid = ");
    assert!(e.contains("rules.toml:1:"), "{e}");
    let e = errors("[[rule]]\nid = \"x\"\ndescription = \"d\"\ncode = \"550\"\nclassification = \"Content\"\nreason = \"x\"\nshaping = { action = \"throttle\", duration = \"1h\" }\nexamples = [\"550 x\"]\n");
    assert!(e.contains("rules.toml:7:") && e.contains("needs messages_per_minute, connections or both"), "{e}");
    let dup = "[[rule]]\nid = \"x\"\ndescription = \"d\"\ncode = \"550\"\nclassification = \"Content\"\nreason = \"x\"\nexamples = [\"550 x\"]\n";
    let e = errors(&format!("{dup}\n{}", dup.replace("550", "551")));
    assert!(e.contains("rules.toml:9:") && e.contains("already used at rules.toml:1"), "{e}");
}

#[test]
fn shadowed_rules_are_rejected_with_the_rule_that_shadows_them() {
    let e = errors(
        r#"
[[rule]]
id = "broad"
description = "d"
code = "5xx"
classification = "Content"
reason = "x"
examples = ["550 anything"]

[[rule]]
id = "narrow"
description = "d"
code = "550"
enhanced = "5.1.1"
text = "unknown"
classification = "Invalid Address"
reason = "user_unknown"
examples = ["550 5.1.1 user unknown"]
"#,
    );
    assert!(e.contains("rule \"narrow\" can never match: rule \"broad\" at rules.toml:2 comes first"), "{e}");
}
