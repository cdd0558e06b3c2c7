//! Red-team attacks on the delivery guarantees of followed files (ARCHITECTURE.md, Delivery
//! receipts and Invariants): outages, kills, rotations and truncations at awkward moments.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn lines_of(prefix: &str, range: std::ops::Range<usize>) -> String {
    range.map(|i| format!("{prefix}-{i}\n")).collect()
}

/// Lines of about `width` bytes: `prefix-i-xxxx…`.
fn wide_lines(prefix: &str, range: std::ops::Range<usize>, width: usize) -> String {
    range.map(|i| format!("{prefix}-{i}-{}\n", "x".repeat(width))).collect()
}

/// Logcollector originals received so far, in order.
fn received(env: &Env) -> Vec<String> {
    env.mock
        .stateless_events()
        .iter()
        .filter(|e| e.header["module"] == "logcollector")
        .map(|e| e.data.as_ref().unwrap()["event"]["original"].as_str().unwrap().to_string())
        .collect()
}

/// The distinct `i` of received lines `prefix-i[-…]`.
fn indices(env: &Env, prefix: &str) -> std::collections::BTreeSet<usize> {
    let p = format!("{prefix}-");
    received(env)
        .iter()
        .filter_map(|l| l.strip_prefix(&p))
        .filter_map(|rest| rest.split('-').next().and_then(|n| n.parse().ok()))
        .collect()
}

/// Waits until every `prefix-i` of `0..n` arrived (or `within` passed); returns the missing count.
fn missing(env: &Env, prefix: &str, n: usize, within: Duration) -> usize {
    env.mock.wait_until(within, |_| indices(env, prefix).len() >= n);
    n - indices(env, prefix).range(0..n).count()
}

fn setup(files: &[&str], extra: &str) -> (Env, PathBuf) {
    let env = Env::new();
    let logs = env.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let list: Vec<String> = files.iter().map(|f| format!("{:?}", logs.join(f).display().to_string())).collect();
    env.write_config(&format!(
        "events.batch_interval = \"50ms\"\nlogcollector.poll_interval = \"50ms\"\nlogcollector.start = \"beginning\"\nlogcollector.files = [{}]\n{extra}",
        list.join(", ")
    ));
    (env, logs)
}

/// Whether the agent holds `path` open.
fn follows(agent: &Agent, path: &Path) -> bool {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", agent.child.id())).into_iter().flatten().flatten();
    fds.filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|p| p == path)
}

/// Whether the agent holds a deleted or renamed file open whose link names `name`.
fn follows_named(agent: &Agent, name: &str) -> bool {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", agent.child.id())).into_iter().flatten().flatten();
    fds.filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|p| p.to_string_lossy().contains(name))
}

/// Two rename rotations during one outage (logrotate with size triggers, or a long outage
/// with daily rotation): the middle file must be delivered too.
#[test]
#[ignore = "reproduces: a second rename rotation during an outage loses the whole middle file"]
fn two_rotations_during_an_outage_lose_no_file() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    let agent = env.running_agent();
    env.mock.set_down(true);
    append(&log, &lines_of("a", 0..1000));
    assert!(wait_for(Duration::from_secs(10), || follows(&agent, &log)));
    std::thread::sleep(Duration::from_millis(500));
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    append(&log, &lines_of("b", 0..1000));
    // The agent sees the rotation and drains the old file (which the outage keeps open).
    std::thread::sleep(Duration::from_millis(500));
    std::fs::rename(logs.join("app.log.1"), logs.join("app.log.2")).unwrap();
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    append(&log, &lines_of("c", 0..1000));
    std::thread::sleep(Duration::from_millis(500));
    env.mock.set_down(false);
    assert_eq!(missing(&env, "a", 1000, Duration::from_secs(20)), 0, "first file");
    assert_eq!(missing(&env, "c", 1000, Duration::from_secs(20)), 0, "newest file");
    assert_eq!(missing(&env, "b", 1000, Duration::from_secs(5)), 0, "middle file (app.log.1 at the second rotation)");
}

/// copytruncate while an outage holds the reader back, and the application writes more than
/// the agent had read before the server is back: the new content must be read from 0.
#[test]
fn copytruncate_during_an_outage_reads_the_new_content_from_its_start() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    let agent = env.running_agent();
    env.mock.set_down(true);
    // 3 MiB in 1 KiB lines: the agent reads 2 MiB (its limit per file unacknowledged) and waits.
    append(&log, &wide_lines("old", 0..3000, 1000));
    assert!(wait_for(Duration::from_secs(10), || follows(&agent, &log)));
    std::thread::sleep(Duration::from_secs(1));
    std::fs::copy(&log, logs.join("app.log.1")).unwrap();
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(0).unwrap();
    // The truncated file is small for a while (polls every 50 ms could see the shrink)…
    append(&log, &wide_lines("new", 0..100, 1000));
    std::thread::sleep(Duration::from_millis(500));
    // … then regrows past the old read position before the server is back.
    append(&log, &wide_lines("new", 100..3000, 1000));
    env.mock.set_down(false);
    let lost = missing(&env, "new", 3000, Duration::from_secs(30));
    assert_eq!(lost, 0, "{lost} of 3000 lines written after the truncation never arrived");
}

/// Same, with short lines: the reader is held back by the full ring (blocked in its send),
/// not by its per-file limit.
#[test]
fn copytruncate_while_the_ring_is_full_reads_the_new_content_from_its_start() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    let agent = env.running_agent();
    env.mock.set_down(true);
    append(&log, &lines_of("old", 0..100_000));
    assert!(wait_for(Duration::from_secs(10), || follows(&agent, &log)));
    std::thread::sleep(Duration::from_secs(1));
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(0).unwrap();
    append(&log, &lines_of("new", 0..1000));
    std::thread::sleep(Duration::from_millis(500));
    append(&log, &lines_of("new", 1000..150_000));
    env.mock.set_down(false);
    let lost = missing(&env, "new", 150_000, Duration::from_secs(40));
    assert_eq!(lost, 0, "{lost} of 150000 lines written after the truncation never arrived");
}

/// A clean stop (SIGTERM) while a file rotated during an outage still drains: its lines are
/// not spilled (they "stay in the file"), so the next start must read them.
#[test]
#[ignore = "reproduces: SIGTERM after a rename rotation during an outage loses the rotated file's unsent lines"]
fn a_clean_stop_after_a_rotation_during_an_outage_loses_nothing() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    let mut agent = env.running_agent();
    env.mock.set_down(true);
    append(&log, &lines_of("old", 0..2000));
    assert!(wait_for(Duration::from_secs(10), || follows(&agent, &log)));
    std::thread::sleep(Duration::from_millis(500));
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    append(&log, &lines_of("new", 0..2000));
    assert!(wait_for(Duration::from_secs(10), || follows_named(&agent, "app.log.1")));
    std::thread::sleep(Duration::from_millis(500));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0));
    env.mock.set_down(false);
    let _agent = env.running_agent();
    assert_eq!(missing(&env, "new", 2000, Duration::from_secs(20)), 0, "the new file");
    assert_eq!(missing(&env, "old", 2000, Duration::from_secs(5)), 0, "the rotated-away file");
}
