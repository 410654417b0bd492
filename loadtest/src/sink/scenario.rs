//! What the sink answers: an ordered list of rules, each saying at which SMTP stage and for
//! which envelope it applies, and what to do there (a reply, a delay, hanging up).
//!
//! A scenario is plain data (`Deserialize`), so a mock ISP is described in a file (see
//! [`super::profile`]). A rule can apply to a percentage of the envelopes it matches: that is
//! how a provider defers 3% and bounces 1% of its mail.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
pub use sluice_rules::Stage;

/// An SMTP reply the sink sends, possibly multi-line.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ReplySpec {
    pub code: u16,
    /// The text of each line after the code (enhanced code included, as written).
    pub lines: Vec<String>,
}

impl ReplySpec {
    /// A one-line reply.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        ReplySpec { code, lines: vec![text.into()] }
    }

    /// The reply on the wire: `code-text` for all lines but the last, `code text` for it.
    pub fn to_wire(&self) -> String {
        let mut out = String::new();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i + 1 == self.lines.len() { ' ' } else { '-' };
            out.push_str(&format!("{}{}{}\r\n", self.code, sep, line));
        }
        out
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }
}

impl FromStr for ReplySpec {
    type Err = String;

    /// Parses `550 5.1.1 no such user`; several lines are separated by `\n`, and lines after
    /// the first may repeat the code (`452-4.2.2 full\n452 4.2.2 try later`) or omit it.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut lines = s.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.trim().is_empty());
        let first = lines.next().ok_or("a reply needs at least one line")?;
        let code_of = |l: &str| -> Option<u16> {
            let c = l.get(..3)?;
            let code: u16 = c.parse().ok()?;
            let sep = l.as_bytes().get(3);
            ((200..600).contains(&code) && matches!(sep, None | Some(b' ') | Some(b'-'))).then_some(code)
        };
        let code = code_of(first).ok_or_else(|| format!("reply {first:?} must start with a code from 200 to 599"))?;
        let text = |l: &str| -> String {
            match code_of(l) {
                Some(c) if c == code => l.get(4..).unwrap_or("").to_string(),
                _ => l.trim_start().to_string(),
            }
        };
        let mut out = vec![text(first)];
        out.extend(lines.map(text));
        Ok(ReplySpec { code, lines: out })
    }
}

impl TryFrom<String> for ReplySpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for ReplySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

/// How long the sink takes to answer at each stage (before the reply; a rule's `delay` adds
/// to it). Real MX hosts take milliseconds at connect and after DATA, less elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Latency {
    /// Before the banner.
    #[serde(with = "humantime_serde")]
    pub connect: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub ehlo: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub starttls: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub mail: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub rcpt: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub data: Option<Duration>,
    /// After the final dot: where real providers spend their time (filtering, storing).
    #[serde(with = "humantime_serde")]
    pub end_of_data: Option<Duration>,
}

impl Latency {
    pub fn at(&self, stage: Stage) -> Option<Duration> {
        match stage {
            Stage::Connect => self.connect,
            Stage::Ehlo => self.ehlo,
            Stage::StartTls => self.starttls,
            Stage::Mail => self.mail,
            Stage::Rcpt => self.rcpt,
            Stage::Data => self.data,
            Stage::EndOfData => self.end_of_data,
        }
        .filter(|d| !d.is_zero())
    }
}

/// Which envelopes a rule applies to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    /// Every envelope, at every stage.
    #[default]
    Any,
    /// Recipients whose local part starts with this (case-insensitive).
    LocalPartPrefix(String),
    /// One recipient address (case-insensitive).
    Recipient(String),
    /// Recipients at this domain (case-insensitive).
    Domain(String),
    /// The envelope sender (case-insensitive).
    Sender(String),
}

/// The envelope a rule is matched against. Recipient conditions see the recipient being
/// added at `rcpt`, and any accepted recipient at `data` and `end_of_data`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Envelope<'a> {
    pub sender: Option<&'a str>,
    pub recipients: &'a [String],
}

impl Match {
    fn matches(&self, env: &Envelope<'_>) -> bool {
        let any_rcpt = |f: &dyn Fn(&str) -> bool| env.recipients.iter().any(|r| f(r));
        match self {
            Match::Any => true,
            Match::LocalPartPrefix(p) => any_rcpt(&|r| {
                let local = r.rsplit_once('@').map(|(l, _)| l).unwrap_or(r);
                local.to_ascii_lowercase().starts_with(&p.to_ascii_lowercase())
            }),
            Match::Recipient(a) => any_rcpt(&|r| r.eq_ignore_ascii_case(a)),
            Match::Domain(d) => any_rcpt(&|r| r.rsplit_once('@').is_some_and(|(_, rd)| rd.eq_ignore_ascii_case(d))),
            Match::Sender(s) => env.sender.is_some_and(|x| x.eq_ignore_ascii_case(s)),
        }
    }
}

/// One rule: at `stage`, for envelopes matching `when`, wait `delay`, then send `reply`
/// (the stage's normal reply when `None`) or hang up.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub stage: Stage,
    #[serde(default)]
    pub when: Match,
    #[serde(default)]
    pub reply: Option<ReplySpec>,
    #[serde(default, with = "humantime_serde")]
    pub delay: Option<Duration>,
    /// Apply only to the first N matches, counted per recipient at `rcpt`, per sender at
    /// `mail`, per envelope at `data`/`end_of_data` and per server otherwise; then the rule
    /// is skipped (e.g. "defer twice, then accept").
    #[serde(default)]
    pub times: Option<u32>,
    /// Close the connection (after `delay`) without replying.
    #[serde(default)]
    pub disconnect: bool,
    /// Apply to this percentage (0–100) of the matching envelopes, chosen at random. The
    /// percentage rules that match at one stage share one random draw and take consecutive
    /// slices of it, so `defer 3%` followed by `bounce 1%` gives exactly 3% and 1%, not 1%
    /// of the remaining 97%.
    #[serde(default)]
    pub percent: Option<f64>,
}

impl Rule {
    /// A rule at `stage` for every envelope that changes nothing yet; refine it with the
    /// builder methods.
    pub fn at(stage: Stage) -> Rule {
        Rule { stage, when: Match::Any, reply: None, delay: None, times: None, disconnect: false, percent: None }
    }

    pub fn when(mut self, m: Match) -> Rule {
        self.when = m;
        self
    }

    /// Sets the reply. Panics on a malformed reply: this is for literals in tests and code.
    pub fn reply(mut self, reply: &str) -> Rule {
        self.reply = Some(reply.parse().unwrap_or_else(|e| panic!("bad reply literal {reply:?}: {e}")));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Rule {
        self.delay = Some(delay);
        self
    }

    pub fn times(mut self, n: u32) -> Rule {
        self.times = Some(n);
        self
    }

    pub fn disconnect(mut self) -> Rule {
        self.disconnect = true;
        self
    }

    pub fn percent(mut self, percent: f64) -> Rule {
        self.percent = Some(percent);
        self
    }

    /// `"rules[i].field: reason"`-style problems: a reply that is not a failure where the
    /// stage needs one, a percentage outside 0–100.
    fn validate(&self) -> Result<(), String> {
        if let Some(p) = self.percent {
            if !(0.0..=100.0).contains(&p) || p.is_nan() {
                return Err(format!("percent: {p} is not between 0 and 100"));
            }
        }
        if self.stage == Stage::Data {
            if let Some(r) = &self.reply {
                if r.code != 354 && r.is_positive() {
                    return Err(format!("reply: {} at data must be 354 or a failure", r.code));
                }
            }
        }
        Ok(())
    }
}

/// What the sink does at one stage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Action {
    pub delay: Option<Duration>,
    /// `None`: the normal reply for the stage.
    pub reply: Option<ReplySpec>,
    pub disconnect: bool,
}

/// The rules of a mock server, first match wins.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Seeds the random choices of `percent` rules, so that a run makes the same number of
    /// hits for the same number of decisions (which connection gets which draw still
    /// depends on timing). Unseeded by default.
    #[serde(default)]
    pub seed: Option<u64>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario::standard()
    }
}

impl Scenario {
    /// Accepts everything.
    pub fn accept_all() -> Scenario {
        Scenario { rules: Vec::new(), seed: None }
    }

    /// Recipients whose local part starts with `bounce` are rejected with `550 5.1.1`, with
    /// `defer` deferred with `451 4.7.1`; everything else is accepted.
    pub fn standard() -> Scenario {
        Scenario::accept_all()
            .rule(
                Rule::at(Stage::Rcpt)
                    .when(Match::LocalPartPrefix("bounce".into()))
                    .reply("550 5.1.1 The email account that you tried to reach does not exist"),
            )
            .rule(Rule::at(Stage::Rcpt).when(Match::LocalPartPrefix("defer".into())).reply("451 4.7.1 Try again later"))
    }

    /// Appends a rule (it applies after the existing ones).
    pub fn rule(mut self, rule: Rule) -> Scenario {
        self.rules.push(rule);
        self
    }

    /// Makes the percentage draws repeatable.
    pub fn seeded(mut self, seed: u64) -> Scenario {
        self.seed = Some(seed);
        self
    }

    /// Puts a rule before the existing ones.
    pub fn first(mut self, rule: Rule) -> Scenario {
        self.rules.insert(0, rule);
        self
    }

    /// Checks every rule; the error names the rule (`rules[2].percent: ...`).
    pub fn validate(&self) -> Result<(), String> {
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate().map_err(|e| format!("rules[{i}].{e}"))?;
        }
        let mut per_stage: HashMap<(Stage, &Match), f64> = HashMap::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(p) = rule.percent {
                let total = per_stage.entry((rule.stage, &rule.when)).or_insert(0.0);
                *total += p;
                if *total > 100.0 + 1e-9 {
                    return Err(format!(
                        "rules[{i}].percent: the percentages at {} add up to {total}, more than 100",
                        rule.stage.as_str()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A scenario plus the per-rule counters that `times` needs.
pub(crate) struct ScenarioState {
    pub scenario: Scenario,
    hits: Mutex<HashMap<(usize, String), u32>>,
    seeded: Option<Mutex<rand::rngs::StdRng>>,
}

impl ScenarioState {
    pub fn new(scenario: Scenario) -> Self {
        use rand::SeedableRng;
        let seeded = scenario.seed.map(|s| Mutex::new(rand::rngs::StdRng::seed_from_u64(s)));
        ScenarioState { scenario, hits: Mutex::new(HashMap::new()), seeded }
    }

    /// The action of the first matching rule at `stage` (the default action if none).
    pub fn decide(&self, stage: Stage, env: &Envelope<'_>) -> Action {
        match &self.seeded {
            Some(rng) => self.decide_with(stage, env, &mut *rng.lock().expect("scenario lock")),
            None => self.decide_with(stage, env, &mut rand::rng()),
        }
    }

    /// [`decide`](Self::decide) with a given source of randomness (tests use a seeded one).
    pub fn decide_with(&self, stage: Stage, env: &Envelope<'_>, rng: &mut impl rand::Rng) -> Action {
        // One draw per decision; percentage rules take consecutive slices of it.
        let mut draw: Option<f64> = None;
        let mut slice_start = 0.0;
        for (i, rule) in self.scenario.rules.iter().enumerate() {
            if rule.stage != stage || !rule.when.matches(env) {
                continue;
            }
            if let Some(p) = rule.percent {
                let u = *draw.get_or_insert_with(|| rng.random_range(0.0..100.0));
                let hit = u >= slice_start && u < slice_start + p;
                slice_start += p;
                if !hit {
                    continue;
                }
            }
            if let Some(limit) = rule.times {
                let key = match stage {
                    Stage::Rcpt => env.recipients.first().map(|r| r.to_ascii_lowercase()).unwrap_or_default(),
                    Stage::Mail => env.sender.unwrap_or("").to_ascii_lowercase(),
                    Stage::Data | Stage::EndOfData => {
                        format!("{}>{}", env.sender.unwrap_or(""), env.recipients.join(",")).to_ascii_lowercase()
                    }
                    _ => String::new(),
                };
                let mut hits = self.hits.lock().expect("scenario lock");
                let n = hits.entry((i, key)).or_insert(0);
                if *n >= limit {
                    continue;
                }
                *n += 1;
            }
            return Action { delay: rule.delay, reply: rule.reply.clone(), disconnect: rule.disconnect };
        }
        Action::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpt(addr: &str) -> Vec<String> {
        vec![addr.to_string()]
    }

    #[test]
    fn reply_specs_parse_single_and_multi_line() {
        let r: ReplySpec = "550 5.7.606 Access denied".parse().unwrap();
        assert_eq!((r.code, r.lines.clone()), (550, vec!["5.7.606 Access denied".to_string()]));
        assert_eq!(r.to_wire(), "550 5.7.606 Access denied\r\n");
        let r: ReplySpec = "452-4.2.2 over quota\n452 4.2.2 try later".parse().unwrap();
        assert_eq!(r.to_wire(), "452-4.2.2 over quota\r\n452 4.2.2 try later\r\n");
        assert!("hello".parse::<ReplySpec>().is_err());
        assert!("".parse::<ReplySpec>().is_err());
        assert!("700 nope".parse::<ReplySpec>().is_err());
    }

    #[test]
    fn standard_scenario_bounces_and_defers_by_local_part() {
        let s = ScenarioState::new(Scenario::standard());
        let act = |a: &str| s.decide(Stage::Rcpt, &Envelope { sender: None, recipients: &rcpt(a) }).reply.map(|r| r.code);
        assert_eq!(act("Bounce-1@x.test"), Some(550));
        assert_eq!(act("defer7@x.test"), Some(451));
        assert_eq!(act("ok@x.test"), None);
    }

    #[test]
    fn times_limits_a_rule_per_recipient() {
        let s = ScenarioState::new(
            Scenario::accept_all().rule(Rule::at(Stage::Rcpt).when(Match::Domain("x.test".into())).reply("451 4.3.0 later").times(2)),
        );
        let a = rcpt("a@x.test");
        let b = rcpt("b@x.test");
        let code = |r: &[String]| s.decide(Stage::Rcpt, &Envelope { sender: None, recipients: r }).reply.map(|r| r.code);
        assert_eq!([code(&a), code(&a), code(&a)], [Some(451), Some(451), None]);
        assert_eq!(code(&b), Some(451), "counted per recipient");
    }

    #[test]
    fn percentages_are_disjoint_slices_of_one_draw() {
        use rand::SeedableRng;
        let s = ScenarioState::new(
            Scenario::accept_all()
                .rule(Rule::at(Stage::Rcpt).percent(3.0).reply("451 4.7.1 later"))
                .rule(Rule::at(Stage::Rcpt).percent(1.0).reply("550 5.1.1 unknown"))
                .rule(Rule::at(Stage::Rcpt).when(Match::Domain("never.test".into())).reply("550 5.7.1 no")),
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let rcpt = rcpt("a@x.test");
        let env = Envelope { sender: None, recipients: &rcpt };
        let n = 200_000;
        let mut counts = HashMap::new();
        for _ in 0..n {
            let code = s.decide_with(Stage::Rcpt, &env, &mut rng).reply.map(|r| r.code).unwrap_or(250);
            *counts.entry(code).or_insert(0u32) += 1;
        }
        let share = |code| counts.get(&code).copied().unwrap_or(0) as f64 * 100.0 / n as f64;
        // Binomial standard deviations at n = 200,000: 0.038 points for 3%, 0.022 for 1%.
        assert!((share(451) - 3.0).abs() < 0.2, "{counts:?}");
        assert!((share(550) - 1.0).abs() < 0.15, "{counts:?}");
        assert!((share(250) - 96.0).abs() < 0.25, "{counts:?}");
        assert_eq!(s.decide_with(Stage::Mail, &env, &mut rng), Action::default(), "other stages are untouched");
    }

    #[test]
    fn seeded_scenarios_repeat_their_draws() {
        let scenario = Scenario::accept_all().rule(Rule::at(Stage::Rcpt).percent(50.0).reply("451 4.7.1 later")).seeded(42);
        let rcpt = rcpt("a@x.test");
        let env = Envelope { sender: None, recipients: &rcpt };
        let run = || {
            let s = ScenarioState::new(scenario.clone());
            (0..64).map(|_| s.decide(Stage::Rcpt, &env).reply.is_some()).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn invalid_percentages_are_refused() {
        let over = Scenario::accept_all().rule(Rule::at(Stage::Rcpt).percent(60.0)).rule(Rule::at(Stage::Rcpt).percent(50.0));
        assert!(over.validate().unwrap_err().contains("rules[1].percent"));
        assert!(Scenario::accept_all().rule(Rule::at(Stage::Rcpt).percent(-1.0)).validate().is_err());
        let other_stage = Scenario::accept_all().rule(Rule::at(Stage::Rcpt).percent(60.0)).rule(Rule::at(Stage::Mail).percent(50.0));
        assert!(other_stage.validate().is_ok(), "percentages add up per stage");
    }

    #[test]
    fn scenarios_deserialize_from_data() {
        let s: Scenario = serde_json::from_value(serde_json::json!({
            "rules": [
                {"stage": "connect", "reply": "421 4.7.0 too many connections", "times": 1},
                {"stage": "end_of_data", "when": {"sender": "slow@x.test"}, "delay": "2s"}
            ]
        }))
        .unwrap();
        assert_eq!(s.rules[0].reply.as_ref().unwrap().code, 421);
        assert_eq!(s.rules[1].delay, Some(Duration::from_secs(2)));
        assert_eq!(s.rules[1].when, Match::Sender("slow@x.test".into()));
    }
}
