//! Hot reload: a new table replaces the old one atomically, a broken one is rejected and the
//! old one keeps serving, and classifications running during reloads only ever see a whole
//! table.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_rules::{Classify, Context, Engine, Reply, Source};

/// A table of `n` rules, all tagged `tag`: rule `tag-i` matches `550 r<i>`. Every rule's
/// id and reason carry the tag, so a classification shows which table answered.
fn tagged(tag: &str, n: usize) -> Vec<Source> {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "[[rule]]\nid = \"{tag}-{i}\"\ndescription = \"rule {i} of table {tag}\"\ncode = \"550\"\ntext = \"^r{i}$\"\nclassification = \"Content\"\nreason = \"{tag}\"\nexamples = [\"550 r{i}\"]\n\n"
        ));
    }
    vec![Source::new(format!("{tag}.toml"), text)]
}

#[test]
fn reload_swaps_and_a_broken_table_keeps_the_old_one() {
    let engine = Engine::from_sources(&tagged("a", 3)).unwrap();
    let v1 = engine.version();
    let r = |s: &str| engine.classify(&Reply::parse(s).unwrap(), &Context::default());
    assert_eq!(r("550 r1").rule_id, "a-1");

    let broken = vec![Source::new("b.toml", "[[rule]]\nid = \"b\"\ndescription = \"d\"\ntext = \"(\"\nclassification = \"Content\"\nreason = \"b\"\nexamples = [\"550 x\"]\n")];
    let err = engine.reload_from(&broken).unwrap_err();
    assert!(err.to_string().contains("b.toml:4"), "{err}");
    assert_eq!(engine.version(), v1, "the old table keeps serving");
    assert_eq!(r("550 r1").rule_id, "a-1");

    let done = engine.reload_from(&tagged("b", 3)).unwrap();
    assert!(done.changed() && done.previous == v1 && done.rules == 3);
    assert_eq!(r("550 r1").rule_id, "b-1");
    assert_eq!(r("550 r1").rules_version, engine.version());
}

#[test]
fn reload_rereads_the_files_and_hit_counters_survive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, &tagged("a", 2)[0].text).unwrap();
    let engine = Engine::load(vec![path.clone()]).unwrap();
    let c = |s: &str| engine.classify(&Reply::parse(s).unwrap(), &Context::default()).rule_id;
    assert_eq!(c("550 r0"), "a-0");
    assert_eq!(c("550 r0"), "a-0");
    assert_eq!(c("550 nothing"), "builtin:rfc5321:5xx");
    std::fs::write(&path, tagged("a", 2)[0].text.replace("reason = \"a\"", "reason = \"changed\"")).unwrap();
    let done = engine.reload().unwrap();
    assert!(done.changed());
    assert_eq!(c("550 r0"), "a-0");
    let hits: std::collections::HashMap<String, u64> = engine.hits().into_iter().collect();
    assert_eq!(hits["a-0"], 3, "counted across the reload");
    assert_eq!(hits["a-1"], 0);
    assert_eq!(hits["builtin:rfc5321"], 1);
    std::fs::remove_file(&path).unwrap();
    assert!(engine.reload().unwrap_err().to_string().contains("rules.toml"));
    assert_eq!(c("550 r1"), "a-1", "still serving after a failed re-read");
}

/// Readers classify in a loop while the table is replaced back and forth between two
/// versions (and broken tables are offered in between). Every outcome must come from one
/// whole table: the rule's tag, the reason and the version always agree, and no reply ever
/// falls through to the fallback (which a half-built table would cause).
#[test]
fn classifications_never_see_a_half_loaded_table() {
    const RULES: usize = 40;
    let (a, b) = (tagged("a", RULES), tagged("b", RULES));
    let engine = Arc::new(Engine::from_sources(&a).unwrap());
    let va = engine.version();
    let vb = {
        let probe = Engine::from_sources(&b).unwrap();
        probe.version()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicU64::new(0));
    let seen_b = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (engine, stop, checked, seen_b, va, vb) = (engine.clone(), stop.clone(), checked.clone(), seen_b.clone(), va.clone(), vb.clone());
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let n = i % RULES;
                    let o = engine.classify(&Reply::parse(&format!("550 r{n}")).unwrap(), &Context::default());
                    let (tag, idx) = o.rule_id.split_once('-').unwrap_or_else(|| panic!("fell through to {}", o.rule_id));
                    assert_eq!(idx, n.to_string());
                    assert_eq!(o.reason, tag, "rule and reason from different tables");
                    let want = if tag == "a" { &va } else { &vb };
                    assert_eq!(&o.rules_version, want, "version from a different table than the rule");
                    if tag == "b" {
                        seen_b.store(true, Ordering::Relaxed);
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    let broken = vec![Source::new("broken.toml", "[[rule]]\nid = \"x\"\n")];
    for round in 0..30 {
        engine.reload_from(if round % 2 == 0 { &b } else { &a }).unwrap();
        assert!(engine.reload_from(&broken).is_err());
        std::thread::sleep(Duration::from_millis(2));
    }
    engine.reload_from(&b).unwrap();
    // Let the readers see the final table before stopping them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !seen_b.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("a reader saw an inconsistent table");
    }
    assert!(seen_b.load(Ordering::Relaxed));
    assert!(checked.load(Ordering::Relaxed) > 0);
    assert_eq!(engine.version(), vb);
}

#[test]
fn a_changed_file_is_picked_up_by_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, &tagged("a", 1)[0].text).unwrap();
    let engine = Arc::new(Engine::load(vec![path.clone()]).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let _watch = sluice_rules::watch_files(engine.clone(), move |r| {
        let _ = tx.send(r.map(|x| x.version.to_string()).map_err(|e| e.to_string()));
    })
    .unwrap();
    // Broken first: reported, old table kept. Then fixed: swapped in.
    std::fs::write(&path, "[[rule]]\nid = \"oops\"\n").unwrap();
    let first = rx.recv_timeout(Duration::from_secs(30)).expect("a reload after the change");
    assert!(first.unwrap_err().contains("rules.toml"));
    assert_eq!(engine.classify(&Reply::parse("550 r0").unwrap(), &Context::default()).rule_id, "a-0");
    // Written via a temporary file and a rename, as editors do.
    let tmp = dir.path().join(".rules.toml.swp");
    std::fs::write(&tmp, &tagged("b", 1)[0].text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let mut last = None;
    while let Ok(r) = rx.recv_timeout(Duration::from_secs(30)) {
        if r.is_ok() {
            last = Some(r);
            break;
        }
    }
    assert!(last.is_some(), "the fixed file was loaded");
    assert_eq!(engine.classify(&Reply::parse("550 r0").unwrap(), &Context::default()).rule_id, "b-0");
}
