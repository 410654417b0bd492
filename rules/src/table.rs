//! A compiled rules table: the rules in order, indexed so that classifying a reply looks
//! only at rules whose code and provider fit, and matches all their text patterns in one
//! pass of a `RegexSet`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

use crate::builtin::{self, FallbackLayer};
use crate::pattern::{CodePattern, EnhancedPattern, StageSet};
use crate::provider::{Providers, Via};
use crate::source::Location;
use crate::{BounceClass, BounceType, Classify, Context, Disposition, Outcome, Reply, ShapingAction, Stage};

/// Regexes bigger than this (compiled) are refused: a table is data, not a DoS vector.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// The lazy DFA's cache per `RegexSet`; generous, so matching stays on the fast path.
const DFA_SIZE_LIMIT: usize = 8 << 20;

/// A case-insensitive (by default) regular expression over [`Reply::text`].
#[derive(Clone, Debug)]
pub struct TextPattern {
    pub source: String,
    pub case_sensitive: bool,
    regex: Regex,
}

impl TextPattern {
    pub fn new(source: &str, case_sensitive: bool) -> Result<TextPattern, regex::Error> {
        let regex = RegexBuilder::new(source).case_insensitive(!case_sensitive).size_limit(REGEX_SIZE_LIMIT).build()?;
        Ok(TextPattern { source: source.to_string(), case_sensitive, regex })
    }

    /// The pattern as one member of a `RegexSet` built without flags.
    fn set_member(&self) -> String {
        if self.case_sensitive {
            format!("(?:{})", self.source)
        } else {
            format!("(?i:{})", self.source)
        }
    }

    pub fn find<'t>(&self, text: &'t str) -> Option<&'t str> {
        self.regex.find(text).map(|m| m.as_str())
    }
}

/// A reply a rule must classify, with the context it is classified in.
#[derive(Clone, Debug)]
pub struct Example {
    /// As written in the table.
    pub text: String,
    pub reply: Reply,
    pub mx: Option<String>,
    pub domain: Option<String>,
    pub stage: Option<Stage>,
    pub location: Location,
}

impl Example {
    pub fn context(&self) -> Context<'_> {
        Context { stage: self.stage, mx_host: self.mx.as_deref(), domain: self.domain.as_deref() }
    }
}

/// One rule: what it matches and what it decides.
#[derive(Clone, Debug)]
pub struct Rule {
    pub id: String,
    pub description: String,
    pub location: Location,
    /// Empty: any 4xx or 5xx code (a rule matches a 2xx or 3xx reply only when it names it).
    pub codes: Vec<CodePattern>,
    /// Empty: any enhanced code, or none.
    pub enhanced: Vec<EnhancedPattern>,
    pub text: Option<TextPattern>,
    /// Index into the table's providers.
    pub provider: Option<usize>,
    pub stages: Option<StageSet>,
    pub classification: BounceClass,
    pub reason: String,
    /// `None`: by the reply class (2xx delivered, 4xx retry, 5xx bounce).
    pub disposition: Option<Disposition>,
    /// `None`: by the classification ([`BounceType::default_for`]).
    pub bounce_type: Option<BounceType>,
    pub suppress: bool,
    pub shaping: ShapingAction,
    pub examples: Vec<Example>,
}

impl Rule {
    fn admits_code(&self, code: u16) -> bool {
        if self.codes.is_empty() {
            // Rules describe failures; a positive reply that happens to contain "spam" or
            // "quota" must not be relabelled by a rule that never meant it.
            return code >= 400;
        }
        self.codes.iter().any(|c| c.matches(code))
    }

    /// Every condition but the text pattern (the table's `RegexSet` answers that).
    fn fits(&self, reply: &Reply, stage: Option<Stage>) -> bool {
        if !self.enhanced.is_empty() {
            match reply.enhanced {
                Some(e) if self.enhanced.iter().any(|p| p.matches(e)) => {}
                _ => return false,
            }
        }
        if let Some(set) = self.stages {
            match stage {
                Some(s) if set.contains(s) => {}
                _ => return false,
            }
        }
        true
    }

    /// Whether this rule matches at least every reply `other` matches (for shadowing).
    fn covers(&self, other: &Rule) -> bool {
        let failure = |c: &CodePattern| match c {
            CodePattern::Exact(x) => *x >= 400,
            CodePattern::Class(x) => *x >= 4,
        };
        let codes = match (self.codes.is_empty(), other.codes.is_empty()) {
            (true, true) => true,
            (true, false) => other.codes.iter().all(failure),
            (false, true) => false,
            (false, false) => other.codes.iter().all(|o| self.codes.iter().any(|s| o.within(s))),
        };
        let enhanced = self.enhanced.is_empty()
            || (!other.enhanced.is_empty() && other.enhanced.iter().all(|o| self.enhanced.iter().any(|s| o.within(s))));
        let stages = match (self.stages, other.stages) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(s), Some(o)) => o.within(s),
        };
        let provider = self.provider.is_none() || self.provider == other.provider;
        let text = match (&self.text, &other.text) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(s), Some(o)) => s.source == o.source && (!s.case_sensitive || o.case_sensitive),
        };
        codes && enhanced && stages && provider && text
    }
}

/// Hit counters by rule id, shared by every table an engine loads.
#[derive(Debug, Default)]
pub struct HitCounters {
    by_id: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl HitCounters {
    fn counter(&self, id: &str) -> Arc<AtomicU64> {
        self.by_id.lock().expect("hit counters poisoned").entry(id.to_string()).or_default().clone()
    }

    /// Every rule id ever hit or loaded, with its count, sorted by id.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> =
            self.by_id.lock().expect("hit counters poisoned").iter().map(|(k, c)| (k.clone(), c.load(Ordering::Relaxed))).collect();
        v.sort();
        v
    }
}

/// The text patterns that can matter for one (reply class, provider): one `RegexSet`.
#[derive(Debug)]
struct Bucket {
    set: RegexSet,
    /// Rule index of each pattern in the set, ascending.
    rule_of: Vec<u32>,
}

/// What decided, for `explain`.
#[derive(Clone, Debug)]
pub enum Decider<'t> {
    Rule { index: usize, rule: &'t Rule, why: Vec<String> },
    Fallback(FallbackLayer),
}

/// One rule or layer that matched, with the outcome it gives.
#[derive(Clone, Debug)]
pub struct Candidate<'t> {
    pub decider: Decider<'t>,
    pub outcome: Outcome,
}

/// Why a reply is classified as it is: the winner and the runner-up.
#[derive(Clone, Debug)]
pub struct Explanation<'t> {
    pub text: String,
    pub provider: Option<(&'t str, String)>,
    pub winner: Candidate<'t>,
    pub runner_up: Option<Candidate<'t>>,
}

const CLASSES: usize = 4; // reply classes 2, 3, 4, 5

/// Text rules tried one by one before the table's `RegexSet` is consulted. A rejected try
/// costs a prefilter scan (about a quarter of a set pass on the default table's replies):
/// three tries measured best on the bench's failures (rules/examples/classify_count.rs; 2
/// tries +7% instructions, 4 tries +7%).
const SINGLE_TRIES: usize = 3;

/// A compiled, validated table. Immutable: reloading builds a new one.
#[derive(Debug)]
pub struct Table {
    rules: Vec<Rule>,
    providers: Providers,
    version: Arc<str>,
    /// Candidate rules by (code - 200) × (provider + 1), in table order.
    candidates: Vec<Arc<[u32]>>,
    /// By code - 200: whether any rule could match the code at all (most 2xx: none), so
    /// the provider need not even be looked up.
    any_candidate: Vec<bool>,
    /// By (class - 2) × (provider + 1); `None` when no rule there has a text pattern.
    buckets: Vec<Option<Arc<Bucket>>>,
    hits: Vec<Arc<AtomicU64>>,
    fallback_hits: [Arc<AtomicU64>; 2],
}

impl Table {
    /// Indexes the rules; fails only if the combined `RegexSet` of a bucket exceeds the size
    /// limit although every pattern compiled on its own.
    pub(crate) fn build(rules: Vec<Rule>, providers: Providers, version: Arc<str>, hits: &HitCounters) -> Result<Table, String> {
        let scopes = providers.list().len() + 1;
        let fits_scope = |r: &Rule, scope: usize| r.provider.is_none_or(|p| p + 1 == scope);
        // Identical candidate lists (most codes of a class) share one allocation.
        let mut interned: HashMap<Vec<u32>, Arc<[u32]>> = HashMap::new();
        let mut candidates = Vec::with_capacity(400 * scopes);
        for code in 200..600u16 {
            for scope in 0..scopes {
                let list: Vec<u32> = rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.admits_code(code) && fits_scope(r, scope))
                    .map(|(i, _)| i as u32)
                    .collect();
                candidates.push(interned.entry(list.clone()).or_insert_with(|| Arc::from(list)).clone());
            }
        }
        let any_candidate = (200..600u16).map(|code| rules.iter().any(|r| r.admits_code(code))).collect();
        let mut buckets = Vec::with_capacity(CLASSES * scopes);
        // Scopes whose rules are the same share one compiled set.
        let mut compiled: HashMap<Vec<u32>, Arc<Bucket>> = HashMap::new();
        for class in 2..6u16 {
            for scope in 0..scopes {
                let members: Vec<u32> = rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.text.is_some() && fits_scope(r, scope) && (class * 100..class * 100 + 100).any(|c| r.admits_code(c)))
                    .map(|(i, _)| i as u32)
                    .collect();
                if members.is_empty() {
                    buckets.push(None);
                    continue;
                }
                if let Some(b) = compiled.get(&members) {
                    buckets.push(Some(b.clone()));
                    continue;
                }
                let patterns = members.iter().map(|&i| rules[i as usize].text.as_ref().expect("filtered").set_member());
                let set = RegexSetBuilder::new(patterns)
                    .size_limit(REGEX_SIZE_LIMIT * members.len())
                    .dfa_size_limit(DFA_SIZE_LIMIT)
                    .build()
                    .map_err(|e| format!("the text patterns of {} rules together are too large to compile: {e}; simplify the biggest ones", members.len()))?;
                let bucket = Arc::new(Bucket { set, rule_of: members.clone() });
                compiled.insert(members, bucket.clone());
                buckets.push(Some(bucket));
            }
        }
        let counters = rules.iter().map(|r| hits.counter(&r.id)).collect();
        let fallback_hits = [hits.counter(FallbackLayer::Rfc3463.as_str()), hits.counter(FallbackLayer::Rfc5321.as_str())];
        Ok(Table { rules, providers, version, candidates, any_candidate, buckets, hits: counters, fallback_hits })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    /// The content hash of the files this table was built from.
    pub fn version(&self) -> &Arc<str> {
        &self.version
    }

    /// The index of the first rule that matches, if any.
    fn first_match(&self, reply: &Reply, ctx: &Context<'_>) -> Option<usize> {
        let code = reply.code.checked_sub(200).filter(|c| *c < 400)? as usize;
        if !self.any_candidate[code] {
            return None;
        }
        let scope = self.providers.identify(ctx.mx_host, ctx.domain).map_or(0, |p| p + 1);
        let scopes = self.providers.list().len() + 1;
        let text: Cow<'_, str> = reply.normalized_text();
        // The first few text rules are tried one by one: usually one of them decides, and a
        // single regex with literal prefilters is cheaper than a pass of the whole set. Past
        // them, one pass of the bucket's RegexSet answers for every remaining rule.
        let mut singles_left = SINGLE_TRIES;
        let bucket = self.buckets[(reply.class() as usize - 2) * scopes + scope].as_deref();
        let mut matched: Option<regex::SetMatches> = None;
        for &r in self.candidates[code * scopes + scope].iter() {
            let rule = &self.rules[r as usize];
            if !rule.fits(reply, ctx.stage) {
                continue;
            }
            if let Some(t) = &rule.text {
                if singles_left > 0 && matched.is_none() {
                    singles_left -= 1;
                    if !t.regex.is_match(&text) {
                        continue;
                    }
                } else {
                    // Every text rule the code and scope admit is in the bucket of its class.
                    let b = bucket.expect("a text rule has a bucket");
                    let m = matched.get_or_insert_with(|| b.set.matches(&text));
                    let local = b.rule_of.binary_search(&r).expect("a member of its bucket");
                    if !m.matched(local) {
                        continue;
                    }
                }
            }
            return Some(r as usize);
        }
        None
    }

    fn outcome_of(&self, index: usize, reply: &Reply) -> Outcome {
        let rule = &self.rules[index];
        let disposition = rule.disposition.unwrap_or_else(|| Disposition::of_class(reply.class()));
        let bounce_type = rule.bounce_type.unwrap_or_else(|| BounceType::default_for(rule.classification, reply.class()));
        Outcome {
            disposition,
            classification: rule.classification,
            reason: rule.reason.clone(),
            bounce_type,
            // The table refuses `suppress` on rules that could match a 4xx or are blocks; this
            // keeps the promise for any table: only permanent address-level bounces.
            suppress: rule.suppress && disposition == Disposition::Bounce && bounce_type == BounceType::Bounce && reply.class() == 5,
            rule_id: rule.id.clone(),
            shaping: rule.shaping.clone(),
            rules_version: self.version.clone(),
        }
    }

    /// The winning rule (if a table rule won) and the outcome, without counting a hit.
    pub fn decide(&self, reply: &Reply, ctx: &Context<'_>) -> (Option<usize>, Outcome) {
        match self.first_match(reply, ctx) {
            Some(i) => (Some(i), self.outcome_of(i, reply)),
            None => (None, builtin::fallback(reply, &self.version).1),
        }
    }

    /// Rules that no reply can reach, as (shadowed, by): an earlier rule matches every reply
    /// the later one would.
    pub fn shadowed(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (j, later) in self.rules.iter().enumerate() {
            if let Some(i) = self.rules[..j].iter().position(|earlier| earlier.covers(later)) {
                out.push((j, i));
            }
        }
        out
    }

    /// Every condition of `rule` checked one by one, with a line of explanation each; `None`
    /// when one fails.
    fn why(&self, rule: &Rule, reply: &Reply, ctx: &Context<'_>, text: &str) -> Option<Vec<String>> {
        let mut why = Vec::new();
        if rule.codes.is_empty() {
            if reply.code < 400 {
                return None;
            }
            why.push(format!("code {}: any 4xx or 5xx", reply.code));
        } else {
            let c = rule.codes.iter().find(|c| c.matches(reply.code))?;
            why.push(format!("code {} matches {c}", reply.code));
        }
        if !rule.enhanced.is_empty() {
            let e = reply.enhanced?;
            let p = rule.enhanced.iter().find(|p| p.matches(e))?;
            why.push(format!("enhanced code {e} matches {p}"));
        }
        if let Some(pi) = rule.provider {
            let (found, via) = self.providers.identify_via(ctx.mx_host, ctx.domain)?;
            if found != pi {
                return None;
            }
            let how = match via {
                Via::Mx(s) => format!("MX host {} ends with {s}", ctx.mx_host.unwrap_or_default()),
                Via::Domain(s) => format!("recipient domain {} ends with {s}", ctx.domain.unwrap_or_default()),
            };
            why.push(format!("provider {}: {how}", self.providers.get(pi).id));
        }
        if let Some(set) = rule.stages {
            let s = ctx.stage.filter(|s| set.contains(*s))?;
            why.push(format!("stage {} is one of {set}", s.as_str()));
        }
        if let Some(t) = &rule.text {
            let m = t.find(text)?;
            why.push(format!("text matches /{}/{}: {m:?}", t.source, if t.case_sensitive { "" } else { "i" }));
        }
        Some(why)
    }

    /// The decision with its reasons, and what would have decided had the winner not
    /// existed. Slow (checks every rule one by one); for people, not for the MTA.
    pub fn explain(&self, reply: &Reply, ctx: &Context<'_>) -> Explanation<'_> {
        let text = reply.text();
        let mut found: Vec<Candidate<'_>> = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if found.len() == 2 {
                break;
            }
            if let Some(why) = self.why(rule, reply, ctx, &text) {
                found.push(Candidate { decider: Decider::Rule { index, rule, why }, outcome: self.outcome_of(index, reply) });
            }
        }
        if let Some(o) = builtin::rfc3463(reply, &self.version) {
            found.push(Candidate { decider: Decider::Fallback(FallbackLayer::Rfc3463), outcome: o });
        }
        found.push(Candidate { decider: Decider::Fallback(FallbackLayer::Rfc5321), outcome: builtin::rfc5321(reply, &self.version) });
        let provider = self.providers.identify_via(ctx.mx_host, ctx.domain).map(|(i, via)| {
            let how = match via {
                Via::Mx(s) => format!("MX host ends with {s}"),
                Via::Domain(s) => format!("recipient domain ends with {s}"),
            };
            (self.providers.get(i).id.as_str(), how)
        });
        let mut it = found.into_iter();
        let winner = it.next().expect("the RFC 5321 layer always applies");
        Explanation { text, provider, winner, runner_up: it.next() }
    }
}

impl Classify for Table {
    fn classify(&self, reply: &Reply, ctx: &Context<'_>) -> Outcome {
        match self.first_match(reply, ctx) {
            Some(i) => {
                self.hits[i].fetch_add(1, Ordering::Relaxed);
                self.outcome_of(i, reply)
            }
            None => {
                let (layer, outcome) = builtin::fallback(reply, &self.version);
                self.fallback_hits[layer as usize].fetch_add(1, Ordering::Relaxed);
                outcome
            }
        }
    }

    fn provider_of(&self, mx_host: Option<&str>, domain: Option<&str>) -> Option<String> {
        self.providers.identify(mx_host, domain).map(|i| self.providers.get(i).id.clone())
    }

    fn has_provider(&self, id: &str) -> bool {
        self.providers.index_of(id).is_some()
    }
}
