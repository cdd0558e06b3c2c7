//! The logcollector end to end: files on disk → agent → mock, with rotation, truncation
//! and restarts, asserting exactly-once delivery of every line.

use std::path::PathBuf;
use std::time::Duration;

use wazuh_mock_server::{Fault, FaultAction};

use crate::support::*;

fn expect(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

/// Originals received so far, in order, and the paths they came with.
fn received(env: &Env) -> Vec<(String, String)> {
    env.mock
        .stateless_events()
        .iter()
        .filter(|e| e.header["module"] == "logcollector")
        .map(|e| {
            let d = e.data.as_ref().unwrap();
            (
                d["event"]["original"].as_str().unwrap().to_string(),
                d["log"]["file"]["path"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn wait_lines(env: &Env, n: usize) -> Vec<String> {
    env.mock.wait_until(Duration::from_secs(20), |_| received(env).len() >= n);
    received(env).into_iter().map(|(l, _)| l).collect()
}

fn setup(files: &[&str], start: &str) -> (Env, PathBuf) {
    let env = Env::new();
    let logs = env.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let list: Vec<String> = files.iter().map(|f| format!("{:?}", logs.join(f).display().to_string())).collect();
    env.write_config(&format!(
        "events.batch_interval = \"50ms\"\nlogcollector.poll_interval = \"50ms\"\nlogcollector.start = \"{start}\"\nlogcollector.files = [{}]",
        list.join(", ")
    ));
    (env, logs)
}

#[test]
fn appended_lines_reach_the_server_and_old_content_is_skipped_by_default() {
    let (env, logs) = setup(&["app.log"], "end");
    let log = logs.join("app.log");
    append(&log, &lines_of("old", 0..5));
    let _agent = env.running_agent();
    // Give the collector its first scan (at the end of the file), then append.
    assert!(wait_for(Duration::from_secs(10), || env.data_dir().join("logcollector.json").exists()));
    append(&log, "first line\r\n\nsecond line\npartial");
    let got = wait_lines(&env, 2);
    assert_eq!(got, vec!["first line", "second line"], "CRLF stripped, empty line skipped, partial held");
    append(&log, " now complete\n");
    assert_eq!(wait_lines(&env, 3)[2], "partial now complete");
    assert!(received(&env).iter().all(|(_, p)| *p == log.display().to_string()));
}

#[test]
fn start_beginning_reads_existing_content_and_globs_match() {
    let (env, logs) = setup(&["*.log"], "beginning");
    append(&logs.join("a.log"), &lines_of("a", 0..3));
    append(&logs.join("b.log"), &lines_of("b", 0..2));
    append(&logs.join("c.txt"), "not followed\n");
    let _agent = env.running_agent();
    let mut got = wait_lines(&env, 5);
    got.sort();
    assert_eq!(got, vec!["a-0", "a-1", "a-2", "b-0", "b-1"]);
    // A file that appears later is read from its beginning.
    append(&logs.join("late.log"), &lines_of("late", 0..2));
    let got = wait_lines(&env, 7);
    assert_eq!(&got[5..], &["late-0", "late-1"]);
}

#[test]
fn rename_rotation_loses_and_duplicates_nothing() {
    let (env, logs) = setup(&["app.log"], "beginning");
    let log = logs.join("app.log");
    append(&log, &lines_of("x", 0..100));
    let _agent = env.running_agent();
    wait_lines(&env, 100);
    // Lines written just before the rotation, then rename + create, then more lines.
    append(&log, &lines_of("x", 100..150));
    append(&log, "unfinished");
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    append(&log, &lines_of("y", 0..50));
    let got = wait_lines(&env, 201);
    let mut want = expect("x", 0..150);
    want.push("unfinished".into());
    want.extend(expect("y", 0..50));
    assert_eq!(got, want);
    assert!(
        received(&env).iter().all(|(_, p)| *p == log.display().to_string()),
        "the configured path, also for the old file's rest"
    );
}

#[test]
fn truncation_is_detected_and_the_file_read_again() {
    let (env, logs) = setup(&["app.log"], "beginning");
    let log = logs.join("app.log");
    append(&log, &lines_of("before", 0..20));
    let _agent = env.running_agent();
    wait_lines(&env, 20);
    // copytruncate: the file is emptied in place, then written again.
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(0).unwrap();
    // Shorter than before, so the shrink is visible whenever the next poll comes.
    append(&log, &lines_of("after", 0..5));
    let got = wait_lines(&env, 25);
    assert_eq!(&got[20..], &expect("after", 0..5)[..]);
}

#[test]
fn a_restart_continues_where_it_stopped() {
    let (env, logs) = setup(&["app.log"], "beginning");
    let log = logs.join("app.log");
    append(&log, &lines_of("one", 0..30));
    let mut agent = env.running_agent();
    wait_lines(&env, 30);
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
    append(&log, &lines_of("two", 0..30));
    let _agent = env.running_agent();
    let got = wait_lines(&env, 60);
    let mut want = expect("one", 0..30);
    want.extend(expect("two", 0..30));
    assert_eq!(got, want, "nothing lost, nothing sent twice");
}

#[test]
fn missing_files_are_picked_up_when_they_appear_and_long_lines_are_cut() {
    let (env, logs) = setup(&["later.log"], "end");
    env.write_config(&format!(
        "events.batch_interval = \"50ms\"\nlogcollector.poll_interval = \"50ms\"\nlogcollector.max_line_bytes = 300\nlogcollector.files = [{:?}]",
        logs.join("later.log").display().to_string()
    ));
    let _agent = env.running_agent();
    // The first scan is over once the offsets file exists; the file appears after it.
    assert!(wait_for(Duration::from_secs(10), || env.data_dir().join("logcollector.json").exists()));
    append(&logs.join("later.log"), &format!("short\n{}\n", "z".repeat(1000)));
    let got = wait_lines(&env, 2);
    assert_eq!(got[0], "short", "a file that appears later is read from its start");
    assert_eq!(got[1].len(), 300);
    let ev = env.mock.stateless_events().into_iter().find(|e| e.data.as_ref().unwrap()["tags"].is_array()).unwrap();
    assert_eq!(ev.data.unwrap()["tags"], serde_json::json!(["truncated"]));
}

#[test]
fn start_can_be_set_per_file() {
    let env = Env::new();
    let logs = env.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    append(&logs.join("skip.log"), "old skipped\n");
    append(&logs.join("read.log"), "old read\n");
    env.write_config(&format!(
        "events.batch_interval = \"50ms\"\nlogcollector.poll_interval = \"50ms\"\nlogcollector.start = \"end\"\nlogcollector.files = [{:?}, {{ path = {:?}, start = \"beginning\" }}]",
        logs.join("skip.log").display().to_string(),
        logs.join("read.log").display().to_string()
    ));
    let _agent = env.running_agent();
    assert!(wait_for(Duration::from_secs(10), || env.data_dir().join("logcollector.json").exists()));
    append(&logs.join("skip.log"), "new line\n");
    let mut got = wait_lines(&env, 2);
    got.sort();
    assert_eq!(got, vec!["new line", "old read"]);
}

/// Every line of `prefix-<range>` arrived; returns how many arrived more than once.
fn all_delivered(env: &Env, agent: &Agent, prefix: &str, range: std::ops::Range<usize>) -> usize {
    let n = range.len();
    let ok = env.mock.wait_until(Duration::from_secs(60), |_| {
        let mine: Vec<String> = received(env).into_iter().map(|(l, _)| l).filter(|l| l.starts_with(prefix)).collect();
        unique(mine).0 >= n
    });
    let mine: Vec<String> = received(env).into_iter().map(|(l, _)| l).filter(|l| l.starts_with(prefix)).collect();
    let (distinct, duplicates) = unique(mine);
    let log = agent.log();
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    assert!(ok && distinct == n, "{distinct} of {n} {prefix} lines delivered; agent log ends: {tail:#?}");
    duplicates
}

/// `dropped` of the agent's state.json, once written after a stop.
fn dropped(env: &Env) -> u64 {
    let state = std::fs::read_to_string(env.dir.path().join("run/state.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&state).unwrap()["events"]["dropped"].as_u64().unwrap()
}

#[test]
fn an_outage_and_a_kill_lose_no_line_of_a_followed_file() {
    let (env, logs) = setup(&["app.log"], "beginning");
    let log = logs.join("app.log");
    let agent = env.running_agent();
    env.mock.set_down(true);
    // 60 000 lines during the outage: six times the ring buffer (10 000 events).
    for k in 0..6 {
        append(&log, &lines_of("out", k * 10_000..(k + 1) * 10_000));
    }
    // Let the agent read (and hold) what it can, then kill it without a chance to save anything.
    assert!(wait_for(Duration::from_secs(10), || follows(&agent, &log)));
    std::thread::sleep(Duration::from_secs(1));
    drop(agent);
    let agent = env.spawn_agent();
    std::thread::sleep(Duration::from_secs(1));
    env.mock.set_down(false);
    // Nothing was accepted before the kill, so nothing is sent twice either.
    assert_eq!(all_delivered(&env, &agent, "out-", 0..60_000), 0);
}

#[test]
fn a_reader_faster_than_the_server_drops_nothing() {
    let (env, logs) = setup(&["big.log"], "beginning");
    let log = logs.join("big.log");
    for k in 0..20 {
        append(&log, &lines_of("fast", k * 10_000..(k + 1) * 10_000));
    }
    // Every request waits 50 ms: the file is read far faster than it is sent.
    let action = FaultAction::Delay { ms: 50 };
    env.mock.inject(Fault { path: "/api/v1/events/stateless".into(), times: u32::MAX, action });
    let mut agent = env.running_agent();
    assert_eq!(all_delivered(&env, &agent, "fast-", 0..200_000), 0);
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0));
    assert_eq!(dropped(&env), 0);
}

#[test]
fn a_rotation_during_an_outage_finishes_the_old_file_first() {
    let (env, logs) = setup(&["app.log"], "beginning");
    let log = logs.join("app.log");
    let mut agent = env.running_agent();
    env.mock.set_down(true);
    append(&log, &lines_of("old", 0..30_000));
    assert!(wait_for(Duration::from_secs(10), || follows(&agent, &log)));
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    append(&log, &lines_of("new", 0..20_000));
    env.mock.set_down(false);
    assert_eq!(all_delivered(&env, &agent, "old-", 0..30_000), 0);
    assert_eq!(all_delivered(&env, &agent, "new-", 0..20_000), 0);
    let order: Vec<String> = received(&env).into_iter().map(|(l, _)| l).collect();
    let last_old = order.iter().rposition(|l| l.starts_with("old-")).unwrap();
    let first_new = order.iter().position(|l| l.starts_with("new-")).unwrap();
    assert!(last_old < first_new, "the rotated-away file is finished before the new one starts");
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0));
    assert_eq!(dropped(&env), 0);
}
