//! `sluice rules ...`: the deliverability consultants' tools. Check a table, explain how a
//! reply is classified, measure a table's accuracy on a corpus of real replies, and see what
//! a change would change before deploying it. Table arguments are files, directories (their
//! `*.toml` files by name) or `@default` (the table shipped in this binary).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use sluice_rules::corpus::{self, Entry};
use sluice_rules::{read_sources, Context, Decider, Disposition, Outcome, Reply, Stage, Table, DEFAULT_TABLE};

#[derive(Subcommand)]
pub enum RulesCommand {
    /// Parse and compile a table, run every rule's examples, report shadowed rules. Exits 1
    /// when the table would be rejected.
    Check {
        /// Table files or directories, in order (default: the shipped table).
        files: Vec<PathBuf>,
    },
    /// Show which rule classifies a reply and why, the outcome, and the runner-up.
    Explain {
        /// The reply as received, e.g. "550 5.1.1 user unknown"; lines separated by newlines.
        reply: String,
        /// The MX host that answered (selects provider-scoped rules).
        #[arg(long, conflicts_with = "domain")]
        mx: Option<String>,
        /// The recipient domain (selects provider-scoped rules when no MX is given).
        #[arg(long)]
        domain: Option<String>,
        /// The SMTP stage the reply answered (connect, ehlo, mail, rcpt, data, end_of_data).
        #[arg(long)]
        stage: Option<Stage>,
        /// The table (default: the shipped table).
        #[arg(long = "rules", num_args = 1..)]
        rules: Vec<PathBuf>,
    },
    /// Classify a corpus (TSV: class, disposition, stage, mx, domain, reply) and report the
    /// accuracy, a confusion matrix and every miss.
    Eval {
        corpus: PathBuf,
        /// The table (default: the shipped table).
        #[arg(long = "rules", num_args = 1..)]
        rules: Vec<PathBuf>,
        /// Exit 1 when the classification accuracy is below this (0.0 to 1.0).
        #[arg(long)]
        min_accuracy: Option<f64>,
    },
    /// List the corpus replies two tables classify differently.
    Diff {
        /// The table in use (a file, a directory or @default).
        old: PathBuf,
        /// The changed table.
        new: PathBuf,
        #[arg(long)]
        corpus: PathBuf,
    },
}

pub fn run(cmd: RulesCommand) -> anyhow::Result<()> {
    match cmd {
        RulesCommand::Check { files } => check(&files),
        RulesCommand::Explain { reply, mx, domain, stage, rules } => explain(&reply, mx.as_deref(), domain.as_deref(), stage, &rules),
        RulesCommand::Eval { corpus, rules, min_accuracy } => eval(&corpus, &rules, min_accuracy),
        RulesCommand::Diff { old, new, corpus } => diff(&old, &new, &corpus),
    }
}

fn or_default(files: &[PathBuf]) -> Vec<PathBuf> {
    if files.is_empty() {
        vec![PathBuf::from(DEFAULT_TABLE)]
    } else {
        files.to_vec()
    }
}

/// Reads and compiles a table; a rejected table is an error listing every problem.
fn load(files: &[PathBuf]) -> anyhow::Result<Table> {
    let files = or_default(files);
    let sources = read_sources(&files)?;
    sluice_rules::compile(&sources).map_err(|e| anyhow::anyhow!("{e}"))
}

fn check(files: &[PathBuf]) -> anyhow::Result<()> {
    let files = or_default(files);
    let sources = read_sources(&files)?;
    match sluice_rules::compile(&sources) {
        Ok(t) => {
            let examples: usize = t.rules().iter().map(|r| r.examples.len()).sum();
            println!("{} files, {} providers, {} rules, version {}", sources.len(), t.providers().list().len(), t.rules().len(), t.version());
            println!("{examples} examples: all classify to their own rule");
            println!("shadowed rules: none");
            println!("ok");
            Ok(())
        }
        Err(e) => {
            let problems = e.diagnostics();
            let shadowed = problems.iter().filter(|p| p.contains("can never match")).count();
            for p in &problems {
                println!("{p}");
            }
            if shadowed > 0 {
                println!("shadowed rules: {shadowed}");
            }
            bail!("the table has {} problem(s); it would be rejected", problems.len())
        }
    }
}

fn describe(o: &Outcome) -> String {
    let mut s = format!("{}, {} ({})", o.disposition, o.classification, o.reason);
    if o.suppress {
        s.push_str(", suppress the recipient");
    }
    if o.disposition == Disposition::Bounce {
        s.push_str(&format!(", type {}", o.bounce_type));
    }
    if !o.shaping.is_none() {
        s.push_str(&format!(", shaping: {}", o.shaping));
    }
    s
}

fn explain(reply: &str, mx: Option<&str>, domain: Option<&str>, stage: Option<Stage>, rules: &[PathBuf]) -> anyhow::Result<()> {
    let table = load(rules)?;
    let reply = Reply::parse(&reply.replace("\\n", "\n")).with_context(|| format!("{reply:?} is not an SMTP reply"))?;
    let ctx = Context { stage, mx_host: mx, domain };
    let ex = table.explain(&reply, &ctx);
    println!("reply:     {reply}");
    println!("text:      {}", ex.text);
    let mut context = Vec::new();
    if let Some(s) = stage {
        context.push(format!("stage {}", s.as_str()));
    }
    if let Some(m) = mx {
        context.push(format!("MX host {m}"));
    }
    if let Some(d) = domain {
        context.push(format!("recipient domain {d}"));
    }
    match &ex.provider {
        Some((id, how)) => context.push(format!("provider {id} ({how})")),
        None => context.push("no known provider".into()),
    }
    println!("context:   {}", context.join(", "));
    let show = |label: &str, c: &sluice_rules::Candidate<'_>| match &c.decider {
        Decider::Rule { rule, why, .. } => {
            println!("{label}{} ({})", rule.id, rule.location);
            println!("           {}", rule.description);
            for (i, w) in why.iter().enumerate() {
                println!("{}{w}", if i == 0 { "  why:     " } else { "           " });
            }
            println!("  outcome: {}", describe(&c.outcome));
        }
        Decider::Fallback(layer) => {
            println!("{label}{} ({}; no table rule matched)", c.outcome.rule_id, layer.as_str());
            println!("  outcome: {}", describe(&c.outcome));
        }
    };
    show("matched:   ", &ex.winner);
    if let Some(r) = &ex.runner_up {
        show("runner-up: ", r);
    }
    println!("version:   {}", table.version());
    Ok(())
}

fn read_corpus(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read corpus {}", path.display()))?;
    corpus::parse(&text).with_context(|| format!("corpus {}", path.display()))
}

fn eval(corpus_path: &Path, rules: &[PathBuf], min_accuracy: Option<f64>) -> anyhow::Result<()> {
    let table = load(rules)?;
    let entries = read_corpus(corpus_path)?;
    let ev = corpus::evaluate(&table, &entries);
    println!("table version {} ({} rules), corpus {} ({} replies)", table.version(), table.rules().len(), corpus_path.display(), entries.len());
    println!("classification accuracy: {}/{} = {:.1}%", ev.correct, ev.total, ev.accuracy() * 100.0);
    if ev.dispositions > 0 {
        println!(
            "disposition accuracy:    {}/{} = {:.1}%",
            ev.dispositions_correct,
            ev.dispositions,
            ev.dispositions_correct as f64 * 100.0 / ev.dispositions as f64
        );
    }
    println!("decided by the fallback layers: {}", ev.fallback);
    println!();
    print!("{}", ev.matrix());
    if !ev.misses.is_empty() {
        println!();
        println!("misses:");
        for m in &ev.misses {
            println!("  line {}: expected {}, got {} (rule {}): {}", m.line, m.expected, m.got, m.rule_id, m.reply);
        }
    }
    if let Some(min) = min_accuracy {
        if ev.accuracy() < min {
            bail!("accuracy {:.1}% is below the required {:.1}%", ev.accuracy() * 100.0, min * 100.0);
        }
    }
    Ok(())
}

fn diff(old: &Path, new: &Path, corpus_path: &Path) -> anyhow::Result<()> {
    let old_table = load(&[old.to_path_buf()]).with_context(|| format!("old table {}", old.display()))?;
    let new_table = load(&[new.to_path_buf()]).with_context(|| format!("new table {}", new.display()))?;
    let entries = read_corpus(corpus_path)?;
    let changes = corpus::diff(&old_table, &new_table, &entries);
    println!("old {} (version {}), new {} (version {})", old.display(), old_table.version(), new.display(), new_table.version());
    for c in &changes {
        println!("line {}: {}", c.line, c.reply);
        println!("  old: {} → {}", c.old.rule_id, describe(&c.old));
        println!("  new: {} → {}", c.new.rule_id, describe(&c.new));
        println!("  changes: {}", corpus::differences(&c.old, &c.new).join("; "));
    }
    println!("{} of {} replies are classified differently", changes.len(), entries.len());
    Ok(())
}
