//! CPU time and memory of processes, from /proc (Linux).
//!
//! CPU of a process tree: the root's and every live descendant's user+system time plus the
//! time of their reaped children (`cutime`/`cstime`). A child that exits between two
//! readings moves its time into its parent's `cutime`, so differences between readings stay
//! correct for servers like Postfix whose master forks and reaps helpers.

use std::collections::HashMap;
use std::fs;

/// Seconds per clock tick (`sysconf(_SC_CLK_TCK)`, normally 1/100).
fn tick() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        1.0 / hz as f64
    } else {
        0.01
    }
}

/// `(ppid, utime + stime, cutime + cstime)` in ticks, of a `/proc/<pid>/stat` line.
fn parse_stat_fields(stat: &str) -> Option<(u32, u64, u64)> {
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    let ppid = fields.get(1)?.parse().ok()?;
    let n = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    fields.get(14)?;
    Some((ppid, n(11) + n(12), n(13) + n(14)))
}

/// `(ppid, utime + stime + cutime + cstime in ticks)` of a `/proc/<pid>/stat` line.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    parse_stat_fields(stat).map(|(ppid, own, children)| (ppid, own + children))
}

fn all_processes() -> HashMap<u32, (u32, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Some(parsed) = fs::read_to_string(format!("/proc/{pid}/stat")).ok().as_deref().and_then(parse_stat) {
            out.insert(pid, parsed);
        }
    }
    out
}

/// The root and all its live descendants.
fn tree(root: u32, procs: &HashMap<u32, (u32, u64)>) -> Vec<u32> {
    let mut members = vec![root];
    let mut i = 0;
    while i < members.len() {
        let parent = members[i];
        members.extend(procs.iter().filter(|(_, (ppid, _))| *ppid == parent).map(|(pid, _)| *pid));
        i += 1;
    }
    members.retain(|p| procs.contains_key(p));
    members
}

/// CPU seconds used so far by `root` and its descendants (live and reaped).
pub fn tree_cpu_seconds(root: u32) -> Option<f64> {
    let procs = all_processes();
    procs.get(&root)?;
    let ticks: u64 = tree(root, &procs).iter().map(|p| procs[p].1).sum();
    Some(ticks as f64 * tick())
}

fn field_kb(path: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse().ok())
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    field_kb(&format!("/proc/{pid}/status"), key)
}

/// Memory of `root` and its descendants now, in KiB: the sum of their proportional set sizes
/// (PSS), so pages shared between processes (Postfix's many smtp processes share most of
/// theirs) are counted once, not once per process as a sum of RSS would.
pub fn tree_pss_kb(root: u32) -> u64 {
    let procs = all_processes();
    tree(root, &procs)
        .iter()
        .filter_map(|p| field_kb(&format!("/proc/{p}/smaps_rollup"), "Pss:").or_else(|| status_kb(*p, "VmRSS:")))
        .sum()
}

/// CPU seconds of this process so far (the harness: generator, sinks, DNS), without its
/// children (the sluice under test is one of them).
pub fn self_cpu_seconds() -> f64 {
    fs::read_to_string("/proc/self/stat")
        .ok()
        .as_deref()
        .and_then(parse_stat_fields)
        .map_or(0.0, |(_, own, _)| own as f64 * tick())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_spaces_in_the_name_parse() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 150 50 7 3 20 0 4 0 123 456 789";
        assert_eq!(parse_stat(line), Some((1, 150 + 50 + 7 + 3)));
        assert_eq!(parse_stat_fields(line), Some((1, 200, 10)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(tree_cpu_seconds(me).is_some());
        assert!(tree_pss_kb(me) > 0);
        assert_eq!(tree_cpu_seconds(u32::MAX), None, "no such process");
    }
}
