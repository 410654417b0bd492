//! From table files to a [`Table`]: parse the TOML (keeping spans for `file:line`), check
//! every field, compile the patterns, build the indexes, then run every rule's examples
//! through the finished table. Every problem found is reported, not just the first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Diagnostic, TableError};
use crate::pattern::{CodePattern, EnhancedPattern, StageSet};
use crate::provider::{Provider, Providers};
use crate::source::{line_of, version_of, Location, Source};
use crate::table::{Example, HitCounters, Rule, Table, TextPattern};
use crate::{BounceClass, BounceType, Disposition, Reply, ShapingAction, Stage, Threshold};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    provider: Vec<Spanned<RawProvider>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    id: String,
    #[serde(default)]
    name: Option<String>,
    /// Where the suffixes come from (free text, for people).
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    mx_suffixes: Vec<String>,
    #[serde(default)]
    domain_suffixes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    description: String,
    #[serde(default)]
    code: Option<Spanned<toml::Value>>,
    #[serde(default)]
    enhanced: Option<Spanned<toml::Value>>,
    #[serde(default)]
    text: Option<Spanned<String>>,
    #[serde(default)]
    case_sensitive: bool,
    #[serde(default)]
    provider: Option<Spanned<String>>,
    #[serde(default)]
    stage: Option<Spanned<toml::Value>>,
    classification: Spanned<String>,
    reason: Spanned<String>,
    #[serde(default)]
    disposition: Option<Spanned<String>>,
    /// The bounce event's `type`: "bounce" or "blocked".
    #[serde(default, rename = "type")]
    kind: Option<Spanned<String>>,
    #[serde(default)]
    suppress: bool,
    #[serde(default)]
    shaping: Option<Spanned<RawShaping>>,
    #[serde(default)]
    examples: Option<Spanned<Vec<Spanned<RawExample>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShaping {
    action: String,
    #[serde(default)]
    messages_per_minute: Option<u32>,
    #[serde(default)]
    connections: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    duration: Option<Duration>,
    #[serde(default)]
    threshold: Option<RawThreshold>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThreshold {
    count: u32,
    #[serde(with = "humantime_serde")]
    window: Duration,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawExample {
    Line(String),
    WithContext(ExampleContext),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExampleContext {
    reply: String,
    #[serde(default)]
    mx: Option<String>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    stage: Option<String>,
}

/// Collects problems with their places.
struct Problems<'a> {
    file: &'a str,
    text: &'a str,
    out: &'a mut Vec<Diagnostic>,
}

impl Problems<'_> {
    fn at(&mut self, offset: usize, message: impl Into<String>) {
        self.out.push(Diagnostic { location: self.location(offset), message: message.into() });
    }
    fn location(&self, offset: usize) -> Location {
        Location { file: self.file.to_string(), line: line_of(self.text, offset) }
    }
}

/// One string, or a list of them (`code = "550"` or `code = ["550", "554"]`); integers too.
fn strings(v: &toml::Value) -> Result<Vec<String>, String> {
    let one = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        other => Err(format!("expected a string, found {}", other.type_str())),
    };
    match v {
        toml::Value::Array(items) if items.is_empty() => Err("an empty list matches nothing; leave the key out to match anything".into()),
        toml::Value::Array(items) => items.iter().map(one).collect(),
        other => one(other).map(|s| vec![s]),
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

fn valid_reason(r: &str) -> bool {
    !r.is_empty() && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn shaping(raw: &RawShaping) -> Result<ShapingAction, String> {
    let threshold = match &raw.threshold {
        None => None,
        Some(t) if t.count == 0 => return Err("shaping.threshold.count must be at least 1".into()),
        Some(t) if t.window.is_zero() => return Err("shaping.threshold.window must be longer than 0s".into()),
        Some(t) => Some(Threshold { count: t.count, window: t.window }),
    };
    let duration = || match raw.duration {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("shaping action {:?} needs a duration such as \"30m\"", raw.action)),
    };
    match raw.action.as_str() {
        "none" => {
            if raw.messages_per_minute.is_some() || raw.connections.is_some() || raw.duration.is_some() || threshold.is_some() {
                return Err("shaping action \"none\" takes no other keys".into());
            }
            Ok(ShapingAction::None)
        }
        "throttle" => {
            if raw.messages_per_minute.is_none() && raw.connections.is_none() {
                return Err("shaping action \"throttle\" needs messages_per_minute, connections or both".into());
            }
            if raw.messages_per_minute == Some(0) || raw.connections == Some(0) {
                return Err("a throttle to 0 is a suspension: use action = \"suspend\"".into());
            }
            Ok(ShapingAction::Throttle { messages_per_minute: raw.messages_per_minute, connections: raw.connections, duration: duration()?, threshold })
        }
        "suspend" => {
            if raw.messages_per_minute.is_some() || raw.connections.is_some() {
                return Err("shaping action \"suspend\" takes only duration and threshold".into());
            }
            Ok(ShapingAction::Suspend { duration: duration()?, threshold })
        }
        other => Err(format!("unknown shaping action {other:?}; expected none, throttle or suspend")),
    }
}

/// A rule before its provider is resolved (providers may be defined in later files).
struct Parsed {
    raw: RawRule,
    file: usize,
    offset: usize,
}

/// Builds a table from `sources`, counting hits into `hits` (shared across reloads, so a
/// rule's counter keeps counting when the table is replaced).
pub(crate) fn compile(sources: &[Source], hits: &HitCounters) -> Result<Table, TableError> {
    let mut diags = Vec::new();
    let mut providers = Vec::new();
    let mut parsed = Vec::new();
    for (fi, src) in sources.iter().enumerate() {
        let mut p = Problems { file: &src.name, text: &src.text, out: &mut diags };
        let file: RawFile = match toml::from_str(&src.text) {
            Ok(f) => f,
            Err(e) => {
                let offset = e.span().map(|s| s.start).unwrap_or(0);
                p.at(offset, e.message().trim().to_string());
                continue;
            }
        };
        for prov in file.provider {
            let offset = prov.span().start;
            let raw = prov.into_inner();
            if !valid_id(&raw.id) {
                p.at(offset, format!("provider id {:?} must be letters, digits, '.', '_', '-' or ':'", raw.id));
            }
            if raw.mx_suffixes.is_empty() && raw.domain_suffixes.is_empty() {
                p.at(offset, format!("provider {:?} needs mx_suffixes, domain_suffixes or both", raw.id));
            }
            providers.push((
                Provider { name: raw.name.unwrap_or_else(|| raw.id.clone()), id: raw.id, mx_suffixes: raw.mx_suffixes, domain_suffixes: raw.domain_suffixes },
                p.location(offset),
            ));
        }
        for r in file.rule {
            let offset = r.span().start;
            parsed.push(Parsed { raw: r.into_inner(), file: fi, offset });
        }
    }
    let mut seen_providers: HashMap<String, Location> = HashMap::new();
    for (prov, loc) in &providers {
        if let Some(first) = seen_providers.insert(prov.id.clone(), loc.clone()) {
            diags.push(Diagnostic { location: loc.clone(), message: format!("provider {:?} is already defined at {first}", prov.id) });
        }
    }
    let provider_locations: Vec<Location> = providers.iter().map(|(_, l)| l.clone()).collect();
    let providers = match Providers::new(providers.into_iter().map(|(p, _)| p).collect()) {
        Ok(p) => p,
        Err(e) => {
            let location = provider_locations.first().cloned().unwrap_or(Location { file: "(table)".into(), line: 1 });
            diags.push(Diagnostic { location, message: e });
            Providers::default()
        }
    };

    let mut rules = Vec::new();
    let mut ids: HashMap<String, Location> = HashMap::new();
    for Parsed { raw, file, offset } in parsed {
        let src = &sources[file];
        let mut p = Problems { file: &src.name, text: &src.text, out: &mut diags };
        if let Some(rule) = rule(raw, offset, &providers, &mut p) {
            if let Some(first) = ids.insert(rule.id.clone(), rule.location.clone()) {
                p.at(offset, format!("rule id {:?} is already used at {first}; ids must be unique", rule.id));
                continue;
            }
            rules.push(rule);
        }
    }
    if !diags.is_empty() {
        return Err(TableError::Invalid(diags));
    }

    let first = sources.first().map(|s| s.name.clone()).unwrap_or_else(|| "(table)".into());
    let table = Table::build(rules, providers, Arc::from(version_of(sources)), hits)
        .map_err(|message| TableError::Invalid(vec![Diagnostic { location: Location { file: first, line: 1 }, message }]))?;
    let mut diags = Vec::new();
    for (shadowed, by) in table.shadowed() {
        let (s, b) = (&table.rules()[shadowed], &table.rules()[by]);
        diags.push(Diagnostic {
            location: s.location.clone(),
            message: format!("rule {:?} can never match: rule {:?} at {} comes first and matches every reply it would", s.id, b.id, b.location),
        });
    }
    for (i, rule) in table.rules().iter().enumerate() {
        for ex in &rule.examples {
            let (winner, outcome) = table.decide(&ex.reply, &ex.context());
            if winner != Some(i) {
                diags.push(Diagnostic {
                    location: ex.location.clone(),
                    message: format!("rule {:?}: example {:?} is classified by {:?} instead", rule.id, ex.text, outcome.rule_id),
                });
            }
        }
    }
    if diags.is_empty() {
        Ok(table)
    } else {
        Err(TableError::Invalid(diags))
    }
}

/// Checks and compiles one rule; reports every problem and returns `None` if there was one.
fn rule(raw: RawRule, offset: usize, providers: &Providers, p: &mut Problems<'_>) -> Option<Rule> {
    let before = p.out.len();
    let id = raw.id.get_ref().clone();
    if !valid_id(&id) {
        p.at(raw.id.span().start, format!("rule id {id:?} must be letters, digits, '.', '_', '-' or ':'"));
    } else if id.starts_with("builtin:") {
        p.at(raw.id.span().start, format!("rule id {id:?}: the prefix \"builtin:\" is reserved for the fallback layers"));
    }
    let ctx = |m: String| format!("rule {id:?}: {m}");
    if raw.description.trim().is_empty() {
        p.at(offset, ctx("needs a description saying what it matches and where that is documented".into()));
    }

    let mut codes = Vec::new();
    if let Some(c) = &raw.code {
        match strings(c.get_ref()) {
            Ok(list) => {
                for s in list {
                    match CodePattern::parse(&s) {
                        Ok(x) => codes.push(x),
                        Err(e) => p.at(c.span().start, ctx(e)),
                    }
                }
            }
            Err(e) => p.at(c.span().start, ctx(format!("code: {e}"))),
        }
    }
    let mut enhanced = Vec::new();
    if let Some(c) = &raw.enhanced {
        match strings(c.get_ref()) {
            Ok(list) => {
                for s in list {
                    match EnhancedPattern::parse(&s) {
                        Ok(x) => enhanced.push(x),
                        Err(e) => p.at(c.span().start, ctx(e)),
                    }
                }
            }
            Err(e) => p.at(c.span().start, ctx(format!("enhanced: {e}"))),
        }
    }
    let text = raw.text.as_ref().and_then(|t| match TextPattern::new(t.get_ref(), raw.case_sensitive) {
        Ok(x) => Some(x),
        Err(e) => {
            p.at(t.span().start, ctx(format!("text is not a valid regular expression: {e}")));
            None
        }
    });
    if raw.code.is_none() && raw.enhanced.is_none() && raw.text.is_none() {
        p.at(offset, ctx("needs at least one of code, enhanced or text (a scope alone would match every reply)".into()));
    }
    let provider = raw.provider.as_ref().and_then(|pr| match providers.index_of(pr.get_ref()) {
        Some(i) => Some(i),
        None => {
            p.at(pr.span().start, ctx(format!("unknown provider {:?}; define it in a [[provider]] table", pr.get_ref())));
            None
        }
    });
    let mut stages = None;
    if let Some(s) = &raw.stage {
        match strings(s.get_ref()) {
            Ok(list) => {
                let mut set = StageSet::empty();
                for name in list {
                    match name.parse::<Stage>() {
                        Ok(st) => set.insert(st),
                        Err(e) => p.at(s.span().start, ctx(e)),
                    }
                }
                stages = Some(set);
            }
            Err(e) => p.at(s.span().start, ctx(format!("stage: {e}"))),
        }
    }
    let classification = BounceClass::parse(raw.classification.get_ref()).or_else(|| {
        let names: Vec<&str> = BounceClass::ALL.iter().map(|c| c.as_str()).collect();
        p.at(raw.classification.span().start, ctx(format!("unknown classification {:?}; expected one of: {}", raw.classification.get_ref(), names.join(", "))));
        None
    });
    if !valid_reason(raw.reason.get_ref()) {
        p.at(raw.reason.span().start, ctx(format!("reason {:?} must be a lower-case label such as \"user_unknown\"", raw.reason.get_ref())));
    }
    let disposition = raw.disposition.as_ref().and_then(|d| {
        Disposition::parse(d.get_ref()).or_else(|| {
            p.at(d.span().start, ctx(format!("unknown disposition {:?}; expected delivered, retry or bounce", d.get_ref())));
            None
        })
    });
    let bounce_type = raw.kind.as_ref().and_then(|k| {
        BounceType::parse(k.get_ref()).or_else(|| {
            p.at(k.span().start, ctx(format!("unknown type {:?}; expected \"bounce\" (the address is refused) or \"blocked\" (the sender or message is)", k.get_ref())));
            None
        })
    });
    if raw.suppress {
        if disposition.is_some_and(|d| d != Disposition::Bounce) {
            p.at(offset, ctx("suppress = true needs disposition = \"bounce\" (only bounced recipients are suppressed)".into()));
        }
        // A temporary reply says nothing final about the address, however it is worded.
        let only_5xx = !codes.is_empty()
            && codes.iter().all(|c| match c {
                CodePattern::Exact(x) => (500..600).contains(x),
                CodePattern::Class(x) => *x == 5,
            });
        let code_unreadable = raw.code.is_some() && codes.is_empty(); // reported above
        if !only_5xx && !code_unreadable {
            let at = raw.code.as_ref().map_or(offset, |c| c.span().start);
            p.at(at, ctx("suppress = true on a rule that can match a 4xx reply: only permanent failures are suppressed; set code = \"5xx\" (or 5xx codes)".into()));
        }
        let effective = bounce_type.or_else(|| classification.map(|c| BounceType::default_for(c, 5)));
        if effective == Some(BounceType::Blocked) {
            p.at(offset, ctx("suppress = true on a rule whose bounces are of type \"blocked\" (the sender or the message was refused, not the address): blocked replies are never suppressed".into()));
        }
    }
    let shaping = match &raw.shaping {
        None => ShapingAction::None,
        Some(s) => shaping(s.get_ref()).unwrap_or_else(|e| {
            p.at(s.span().start, ctx(e));
            ShapingAction::None
        }),
    };
    let mut examples = Vec::new();
    match &raw.examples {
        None => p.at(offset, ctx("needs examples: real reply lines that must classify to this rule".into())),
        Some(list) if list.get_ref().is_empty() => p.at(list.span().start, ctx("needs at least one example".into())),
        Some(list) => {
            for ex in list.get_ref() {
                let at = ex.span().start;
                let (text, mx, domain, stage) = match ex.get_ref() {
                    RawExample::Line(l) => (l.clone(), None, None, None),
                    RawExample::WithContext(c) => (c.reply.clone(), c.mx.clone(), c.domain.clone(), c.stage.clone()),
                };
                let reply = match Reply::parse(&text) {
                    Ok(r) => r,
                    Err(e) => {
                        p.at(at, ctx(format!("example {text:?} is not an SMTP reply: {e}")));
                        continue;
                    }
                };
                let stage = match stage.map(|s| s.parse::<Stage>()).transpose() {
                    Ok(s) => s.or_else(|| stages.and_then(|set| set.iter().next())),
                    Err(e) => {
                        p.at(at, ctx(e));
                        continue;
                    }
                };
                // An example of a scoped rule comes from its provider unless it says otherwise.
                let (mx, domain) = match (mx, domain, provider) {
                    (None, None, Some(pi)) => {
                        let prov = providers.get(pi);
                        match prov.mx_suffixes.first() {
                            Some(m) => (Some(m.clone()), None),
                            None => (None, prov.domain_suffixes.first().cloned()),
                        }
                    }
                    (mx, domain, _) => (mx, domain),
                };
                examples.push(Example { text, reply, mx, domain, stage, location: p.location(at) });
            }
        }
    }
    if p.out.len() > before {
        return None;
    }
    Some(Rule {
        id,
        description: raw.description.trim().to_string(),
        location: p.location(offset),
        codes,
        enhanced,
        text,
        provider,
        stages,
        classification: classification?,
        reason: raw.reason.into_inner(),
        disposition,
        bounce_type,
        suppress: raw.suppress,
        shaping,
        examples,
    })
}
