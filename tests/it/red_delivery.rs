//! Red-team attacks on the delivery guarantees of followed files (ARCHITECTURE.md, Delivery
//! receipts and Invariants): outages, kills, rotations and truncations at awkward moments.

use std::time::Duration;

use crate::support::*;

/// Two rename rotations during one outage (logrotate with size triggers, or a long outage
/// with daily rotation): the middle file must be delivered too.
#[test]
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

fn state(env: &Env) -> serde_json::Value {
    let state = std::fs::read_to_string(env.dir.path().join("run/state.json")).unwrap();
    serde_json::from_str(&state).unwrap()
}

/// `kill -9` while the backlog of an outage drains (the server is back and taking lines):
/// the next start resends from the saved offset, nothing is lost.
#[test]
fn a_kill_during_the_drain_after_an_outage_loses_nothing() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    let agent = env.running_agent();
    env.mock.set_down(true);
    append(&log, &lines_of("d", 0..80_000));
    assert!(wait_for(Duration::from_secs(10), || follows(&agent, &log)));
    std::thread::sleep(Duration::from_millis(500));
    // Slow the drain so the kill lands in the middle of it.
    let action = wazuh_mock_server::FaultAction::Delay { ms: 30 };
    env.mock.inject(wazuh_mock_server::Fault { path: "/api/v1/events/stateless".into(), times: u32::MAX, action });
    env.mock.set_down(false);
    assert!(wait_for(Duration::from_secs(20), || indices(&env, "d").len() >= 20_000));
    drop(agent);
    let before = received(&env).len();
    let agent = env.spawn_agent();
    assert_eq!(missing(&env, "d", 80_000, Duration::from_secs(40)), 0, "log: {}", agent.log());
    let (distinct, dups) = dup_count(&env, "d");
    eprintln!("{before} received before the kill; {distinct} distinct, {dups} duplicates");
}

/// SIGTERM while the server is down and the file keeps growing; the next start resends.
#[test]
fn a_stop_during_an_outage_with_a_growing_file_loses_nothing() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    let mut agent = env.running_agent();
    env.mock.set_down(true);
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            for k in 0..40 {
                append(&log, &lines_of("g", k * 1000..(k + 1) * 1000));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0));
    writer.join().unwrap();
    env.mock.set_down(false);
    let agent = env.running_agent();
    assert_eq!(missing(&env, "g", 40_000, Duration::from_secs(30)), 0, "log: {}", agent.log());
    assert_eq!(dup_count(&env, "g").1, 0, "nothing was accepted before the stop");
}

/// A server that refuses one line (400): the line is isolated into rejected.ndjson, the others
/// delivered, and the offset moves past all of them (a restart resends nothing).
#[test]
fn a_refused_line_counts_as_done_and_the_offset_moves() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    env.mock.set_poison(Some("POISON"));
    let mut agent = env.running_agent();
    append(&log, &lines_of("r", 0..500));
    append(&log, "r-500-POISON\n");
    append(&log, &lines_of("r", 501..1000));
    assert_eq!(missing(&env, "r", 1000, Duration::from_secs(5)), 1, "all but the poisoned line");
    let rejected = env.data_dir().join("rejected.ndjson");
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(&rejected).is_ok_and(|s| s.contains("POISON")))
    );
    std::thread::sleep(Duration::from_millis(1500));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0));
    let agent = env.running_agent();
    append(&log, &lines_of("s", 0..10));
    assert_eq!(missing(&env, "s", 10, Duration::from_secs(10)), 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(dup_count(&env, "r").1, 0, "resent after the restart; log: {}", agent.log());
    let n = std::fs::read_to_string(&rejected).unwrap().lines().filter(|l| l.contains("r-500-POISON")).count();
    assert_eq!(n, 1, "the refused line was sent again");
}

/// A server that answers 413 to every stateless body: every line ends in rejected.ndjson,
/// the file is not stuck and a restart does not resend.
#[test]
fn a_server_that_always_answers_413_does_not_stall_the_file() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    let action = wazuh_mock_server::FaultAction::Status { code: 413, retry_after: None, body: None };
    env.mock.inject(wazuh_mock_server::Fault { path: "/api/v1/events/stateless".into(), times: u32::MAX, action });
    let mut agent = env.running_agent();
    append(&log, &lines_of("t", 0..40));
    let rejected = env.data_dir().join("rejected.ndjson");
    let count = || std::fs::read_to_string(&rejected).map_or(0, |s| s.lines().count());
    assert!(wait_for(Duration::from_secs(20), || count() >= 40), "{} of 40 rejected", count());
    std::thread::sleep(Duration::from_millis(1500));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0));
    let _agent = env.running_agent();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(), 40, "lines refused for good were sent again after a restart");
}

/// Socket producers flood under drop_oldest while a file is followed and the server is slow:
/// no file line is dropped and `events.dropped` counts socket events only.
#[test]
fn a_socket_flood_under_drop_oldest_drops_no_file_line_and_counts_only_sockets() {
    let (env, logs) = setup(&["app.log"], "events.buffer_events = 2000\nevents.overflow = \"drop_oldest\"");
    let log = logs.join("app.log");
    let action = wazuh_mock_server::FaultAction::Delay { ms: 100 };
    env.mock.inject(wazuh_mock_server::Fault { path: "/api/v1/events/stateless".into(), times: 40, action });
    let mut agent = env.running_agent();
    append(&log, &lines_of("f", 0..20_000));
    let mut sent = 0;
    for round in 0..10 {
        let reply = env.send_ok(&lines((round * 2000..(round + 1) * 2000).map(stateless)));
        sent += reply["accepted"].as_u64().unwrap() as usize;
    }
    assert_eq!(missing(&env, "f", 20_000, Duration::from_secs(30)), 0);
    // Let the ring drain completely so nothing is spilled at the stop.
    std::thread::sleep(Duration::from_secs(2));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0));
    let got = unique(received(&env).into_iter().filter(|l| l.starts_with("msg-")).collect()).0;
    let dropped = state(&env)["events"]["dropped"].as_u64().unwrap() as usize;
    eprintln!("socket events sent {sent}, received {got}, dropped {dropped}");
    assert_eq!(got + dropped, sent, "dropped must count exactly the socket events lost");
}

/// A file deleted while its lines wait for the server: the open handle is read and delivered.
#[test]
fn a_file_deleted_during_an_outage_is_still_delivered() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    let agent = env.running_agent();
    env.mock.set_down(true);
    append(&log, &lines_of("del", 0..30_000));
    assert!(wait_for(Duration::from_secs(10), || follows(&agent, &log)));
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_file(&log).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    env.mock.set_down(false);
    assert_eq!(missing(&env, "del", 30_000, Duration::from_secs(20)), 0);
}

/// 150 files, a slow server: every line of every file arrives.
#[test]
fn many_files_with_a_slow_server_lose_nothing() {
    let (env, logs) = setup(&["*.log"], "");
    for f in 0..150 {
        append(&logs.join(format!("f{f:03}.log")), &lines_of(&format!("m{f:03}"), 0..200));
    }
    let action = wazuh_mock_server::FaultAction::Delay { ms: 20 };
    env.mock.inject(wazuh_mock_server::Fault { path: "/api/v1/events/stateless".into(), times: u32::MAX, action });
    let _agent = env.running_agent();
    for f in (0..150).step_by(7) {
        append(&logs.join(format!("f{f:03}.log")), &lines_of(&format!("m{f:03}"), 200..400));
    }
    let want = 150 * 200 + 22 * 200;
    let distinct = || unique(received(&env)).0;
    assert!(wait_for(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(500));
        distinct() >= want
    }));
    let got: std::collections::BTreeSet<String> = received(&env).into_iter().collect();
    for f in 0..150 {
        let n = if f % 7 == 0 { 400 } else { 200 };
        let lost = (0..n).filter(|i| !got.contains(&format!("m{f:03}-{i}"))).count();
        assert_eq!(lost, 0, "file {f}");
    }
}

/// Lines of 512 KiB of control characters (six times as long in JSON) while the server is
/// down and the file keeps growing: peak memory stays within the documented 32 MiB.
#[test]
fn escaped_long_lines_during_an_outage_stay_within_32_mib() {
    let (env, logs) = setup(&["app.log"], "logcollector.max_line_bytes = \"512KiB\"");
    let log = logs.join("app.log");
    let agent = env.running_agent();
    let pid = agent.child.id();
    env.mock.set_down(true);
    let line = "\u{1}".repeat(512 << 10);
    for i in 0..40 {
        append(&log, &format!("big-{i}-{line}\n"));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let peak = proc_kb(pid, "VmHWM:");
    eprintln!("VmHWM {peak} kB");
    env.mock.set_down(false);
    assert_eq!(missing(&env, "big", 40, Duration::from_secs(30)), 0);
    assert!(peak <= 32 * 1024, "VmHWM {peak} kB");
}

/// 200 files with a backlog each (start = beginning): once everything is delivered the agent
/// must not keep a read buffer per file (each read allocates up to 256 KiB).
#[test]
fn many_caught_up_files_do_not_keep_a_read_buffer_each() {
    let (env, logs) = setup(&["*.log"], "");
    for f in 0..200 {
        append(&logs.join(format!("f{f:03}.log")), &wide_lines(&format!("k{f:03}"), 0..300, 1000));
    }
    let agent = env.running_agent();
    let pid = agent.child.id();
    let want = 200 * 300;
    assert!(wait_for(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(500));
        received(&env).len() >= want
    }));
    std::thread::sleep(Duration::from_secs(2));
    let (rss, peak) = (proc_kb(pid, "VmRSS:"), proc_kb(pid, "VmHWM:"));
    eprintln!("200 files caught up: VmRSS {rss} kB, VmHWM {peak} kB");
    // A buffer kept per file would add 200 × 256 KiB = 50 MiB to the 27–33 MiB this debug build
    // uses (more glibc arenas when the machine is busy): 40 MiB tells the two apart.
    assert!(rss <= 40 * 1024 && peak <= 40 * 1024, "VmRSS {rss} kB, VmHWM {peak} kB");
}

/// 100 files, each ending in an unfinished line of 500 KiB (max_line_bytes = 512 KiB): each
/// unfinished line is held in memory until its newline comes, with no bound across files.
#[test]
fn unfinished_long_lines_in_many_files_stay_within_32_mib() {
    let (env, logs) = setup(&["*.log"], "logcollector.max_line_bytes = \"512KiB\"");
    let tail = "p".repeat(500 << 10);
    for f in 0..100 {
        append(&logs.join(format!("f{f:03}.log")), &format!("u{f:03}-0\nu{f:03}-1-{tail}"));
    }
    let agent = env.running_agent();
    let pid = agent.child.id();
    assert!(wait_for(Duration::from_secs(20), || received(&env).len() >= 100));
    std::thread::sleep(Duration::from_secs(2));
    let (rss, peak) = (proc_kb(pid, "VmRSS:"), proc_kb(pid, "VmHWM:"));
    eprintln!("100 unfinished 500 KiB lines: VmRSS {rss} kB, VmHWM {peak} kB");
    assert!(peak <= 32 * 1024, "VmRSS {rss} kB, VmHWM {peak} kB");
}

/// Rotation by rename without create (the application creates the new file on its next
/// write), and a restart of the agent in between: the new file was seen under this path
/// before, so all of it is new, whatever `start` says.
#[test]
fn a_file_recreated_while_the_agent_was_stopped_after_a_rotation_is_read_from_its_start() {
    let (env, logs) = setup(&["app.log"], "logcollector.start = \"end\"");
    let log = logs.join("app.log");
    append(&log, &lines_of("skip", 0..10));
    let mut agent = env.running_agent();
    let state = env.data_dir().join("logcollector.json");
    assert!(wait_for(Duration::from_secs(10), || state.exists() && follows(&agent, &log)));
    append(&log, &lines_of("a", 0..100));
    assert_eq!(missing(&env, "a", 100, Duration::from_secs(10)), 0);
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    // The agent finishes the old file and lets it go.
    assert!(wait_for(Duration::from_secs(10), || !follows_named(&agent, "app.log")));
    std::thread::sleep(Duration::from_millis(1500));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0));
    // The application writes again: a new app.log, while the agent is away.
    append(&log, &lines_of("b", 0..100));
    let _agent = env.running_agent();
    assert_eq!(missing(&env, "b", 100, Duration::from_secs(10)), 0, "lines of the new file skipped");
}

/// Rotation during an outage, then `kill -9`: the documented loss is the old file's
/// unacknowledged rest; nothing of the new file may be lost.
#[test]
fn a_kill_after_a_rotation_during_an_outage_loses_nothing_of_the_new_file() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    let agent = env.running_agent();
    append(&log, &lines_of("pre", 0..100));
    assert_eq!(missing(&env, "pre", 100, Duration::from_secs(10)), 0);
    env.mock.set_down(true);
    append(&log, &lines_of("old", 0..1000));
    std::thread::sleep(Duration::from_millis(500));
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    append(&log, &lines_of("new", 0..1000));
    assert!(wait_for(Duration::from_secs(10), || follows_named(&agent, "app.log.1")));
    std::thread::sleep(Duration::from_millis(1500));
    drop(agent);
    append(&log, &lines_of("new", 1000..2000));
    let agent = env.spawn_agent();
    std::thread::sleep(Duration::from_millis(500));
    env.mock.set_down(false);
    assert_eq!(missing(&env, "new", 2000, Duration::from_secs(20)), 0, "log: {}", agent.log());
    assert_eq!(dup_count(&env, "pre").1, 0, "lines acknowledged before the outage were sent again");
}

/// A server that takes a body and then does not answer within the request timeout: the
/// agent resends (duplicates allowed), never loses.
#[test]
fn a_server_that_takes_then_hangs_loses_nothing() {
    let (env, logs) = setup(&["app.log"], "server.request_timeout = \"1s\"");
    let log = logs.join("app.log");
    let _agent = env.running_agent();
    let action = wazuh_mock_server::FaultAction::Delay { ms: 2500 };
    env.mock.inject(wazuh_mock_server::Fault { path: "/api/v1/events/stateless".into(), times: 4, action });
    append(&log, &lines_of("h", 0..20_000));
    assert_eq!(missing(&env, "h", 20_000, Duration::from_secs(30)), 0);
}

/// The smallest ring (`buffer_bytes` = 64 KiB, `buffer_events` small) with lines whose events
/// are far larger than the ring: each still goes through, alone.
#[test]
fn a_ring_smaller_than_one_event_still_delivers_every_line() {
    let extra = "events.buffer_bytes = \"64KiB\"\nlogcollector.max_line_bytes = \"512KiB\"";
    let (env, logs) = setup(&["app.log"], extra);
    let log = logs.join("app.log");
    let _agent = env.running_agent();
    let big = "\u{2}".repeat(200 << 10);
    for i in 0..20 {
        append(&log, &format!("w-{i}-{big}\nw-{}\n", i + 1000));
    }
    env.mock.wait_until(Duration::from_secs(30), |_| indices(&env, "w").len() >= 40);
    assert_eq!(indices(&env, "w").range(0..20).count(), 20, "the long lines");
    let small: std::collections::BTreeSet<usize> = indices(&env, "w").range(1000..1020).copied().collect();
    assert_eq!(small.len(), 20);
}

/// SIGTERM while a restart's shutdown waits for a stalled server, with commands after the
/// restart in the same answer: the agent stops, and after the next start every command has
/// exactly one result and the stateless event of before the restart is not lost.
#[test]
fn sigterm_during_a_restart_with_commands_after_it_reports_each_once() {
    use serde_json::json;
    let (env, mut agent, me) = running_with("");
    let stall = wazuh_mock_server::FaultAction::Delay { ms: 20_000 };
    env.mock.inject(wazuh_mock_server::Fault { path: "/api/v1/events".into(), times: 3, action: stall });
    env.send_ok(&lines([stateless(7)]));
    let answer = vec![
        command("rt-1", "restart", json!({}), None),
        command("after-1", "no-such-action", json!({}), None),
        command("after-2", "no-such-action", json!({}), None),
    ];
    env.mock.enqueue_commands(&me, answer);
    assert!(wait_for(Duration::from_secs(15), || agent.log().contains("restart command received")), "{}", agent.log());
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(30)), Some(0), "{}", agent.log());
    env.mock.clear_faults();
    let _again = env.running_agent();
    for id in ["after-1", "after-2"] {
        assert_eq!(result_of(&env.mock, id, Duration::from_secs(20)), (1, "Command is not valid".to_string()));
    }
    env.mock.enqueue_command(&me, command("last", "no-such-action", json!({}), None));
    result_of(&env.mock, "last", Duration::from_secs(20));
    let results = env.mock.command_results();
    for id in ["rt-1", "after-1", "after-2", "last"] {
        assert_eq!(results.iter().filter(|r| r.0 == id).count(), 1, "{id} reported once: {results:?}");
    }
    assert!(wait_for(Duration::from_secs(10), || originals(&env.mock).contains(&"msg-7".to_string())));
}

/// A glob that also matches the rotated names (`app.log*`, or `/var/log/app/*`): a rename
/// rotation must not send the rotated file's lines a second time.
#[test]
fn a_glob_matching_rotated_names_does_not_resend_the_rotated_file() {
    let (env, logs) = setup(&["app.log*"], "");
    let log = logs.join("app.log");
    let _agent = env.running_agent();
    append(&log, &lines_of("gl", 0..1000));
    assert_eq!(missing(&env, "gl", 1000, Duration::from_secs(10)), 0);
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    append(&log, &lines_of("gn", 0..100));
    assert_eq!(missing(&env, "gn", 100, Duration::from_secs(10)), 0);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(dup_count(&env, "gl").1, 0, "the rotated file was sent again under its new name");
}

/// With a glob that matches rotated names, a rotation during an outage then `kill -9`: the
/// next start finds the rotated file under its new name at its saved offset (no loss of its
/// rest, no resend of what was acknowledged).
#[test]
fn a_kill_after_a_rotation_under_a_glob_resumes_the_rotated_file_at_its_offset() {
    let (env, logs) = setup(&["app.log*"], "");
    let log = logs.join("app.log");
    let agent = env.running_agent();
    append(&log, &lines_of("pre", 0..1000));
    assert_eq!(missing(&env, "pre", 1000, Duration::from_secs(10)), 0);
    std::thread::sleep(Duration::from_millis(1500));
    env.mock.set_down(true);
    append(&log, &lines_of("old", 0..1000));
    std::thread::sleep(Duration::from_millis(500));
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    append(&log, &lines_of("new", 0..1000));
    std::thread::sleep(Duration::from_millis(1500));
    drop(agent);
    let agent = env.spawn_agent();
    std::thread::sleep(Duration::from_millis(500));
    env.mock.set_down(false);
    assert_eq!(missing(&env, "new", 1000, Duration::from_secs(20)), 0, "log: {}", agent.log());
    assert_eq!(missing(&env, "old", 1000, Duration::from_secs(20)), 0, "the rotated file's rest");
    assert_eq!(dup_count(&env, "pre").1, 0, "acknowledged lines sent again");
}

/// The ring shrunk by a group file (live reload) to its minimum while a followed file's
/// backlog fills it and the server is slow: every line still arrives, none is dropped.
#[test]
fn a_ring_shrunk_by_a_group_file_during_a_backlog_drops_nothing() {
    use serde_json::json;
    let env = Env::with(|o| o.command_hold = Duration::from_millis(300));
    let logs = env.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join("app.log");
    env.write_config(&format!(
        "events.batch_interval = \"50ms\"\nlogcollector.poll_interval = \"50ms\"\nlogcollector.start = \"beginning\"\nlogcollector.files = [{:?}]",
        log.display().to_string()
    ));
    let mut agent = env.running_agent();
    let me = uuid(&env);
    let action = wazuh_mock_server::FaultAction::Delay { ms: 100 };
    env.mock.inject(wazuh_mock_server::Fault { path: "/api/v1/events/stateless".into(), times: 60, action });
    append(&log, &lines_of("z", 0..30_000));
    env.mock.set_file("tiny.yml", b"events:\n  buffer_bytes: 64KiB\n  buffer_events: 10\n");
    env.mock.enqueue_command(&me, command("tiny", "set-group", json!({"groups": ["tiny"]}), Some(30)));
    let (code, message) = result_of(&env.mock, "tiny", Duration::from_secs(20));
    assert_eq!(code, 0, "{message}");
    env.send_ok(&lines((0..500).map(stateless)));
    assert_eq!(missing(&env, "z", 30_000, Duration::from_secs(30)), 0);
    std::thread::sleep(Duration::from_secs(1));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0));
    let got = unique(received(&env).into_iter().filter(|l| l.starts_with("msg-")).collect()).0;
    let dropped = state(&env)["events"]["dropped"].as_u64().unwrap() as usize;
    assert_eq!(got + dropped, 500, "socket events: received {got}, dropped {dropped}");
}

/// A ring smaller than one batch (`buffer_events` below `batch_max_events`, which a group file
/// may set) and a healthy, fast server: a full ring must be cut at once, not after
/// `batch_interval`, or drop_oldest drops events the server would have taken.
#[test]
fn a_full_ring_smaller_than_a_batch_is_sent_at_once() {
    let env = Env::new();
    env.write_config("events.buffer_events = 500\nevents.overflow = \"drop_oldest\"");
    let mut agent = env.running_agent();
    // 2 500 events a second, 250 at a time: far less than the server takes.
    for k in 0..20 {
        let reply = env.send_ok(&lines((k * 250..(k + 1) * 250).map(stateless)));
        assert_eq!(reply["accepted"], 250);
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0));
    let dropped = state(&env)["events"]["dropped"].as_u64().unwrap();
    let got = unique(originals(&env.mock)).0;
    assert_eq!(dropped, 0, "dropped with a healthy server; {got} received");
}

/// logrotate renames the file, then its postrotate tells the application to reopen: lines the
/// application writes to the renamed file in between (here, 2 s later) belong to the old file.
#[test]
fn lines_written_to_the_old_file_after_a_rotation_are_delivered() {
    let (env, logs) = setup(&["app.log"], "");
    let log = logs.join("app.log");
    let _agent = env.running_agent();
    append(&log, &lines_of("o", 0..100));
    assert_eq!(missing(&env, "o", 100, Duration::from_secs(10)), 0);
    let old = logs.join("app.log.1");
    std::fs::rename(&log, &old).unwrap();
    append(&log, &lines_of("n", 0..10));
    assert_eq!(missing(&env, "n", 10, Duration::from_secs(10)), 0);
    // The application has not reopened yet: two more lines go to the renamed file.
    std::thread::sleep(Duration::from_secs(2));
    append(&old, &lines_of("o", 100..102));
    append(&log, &lines_of("n", 10..20));
    assert_eq!(missing(&env, "n", 20, Duration::from_secs(10)), 0);
    assert_eq!(missing(&env, "o", 102, Duration::from_secs(3)), 0, "late lines of the rotated file");
}

/// SIGTERM during an outage with socket events and a followed file's lines in the ring: the
/// socket events are spilled (the log counts exactly them), the file's lines are not, and the
/// next start delivers both, each once.
#[test]
fn a_stop_during_an_outage_spills_exactly_the_socket_events() {
    let (env, logs) = setup(&["app.log"], "events.overflow = \"block\"");
    let log = logs.join("app.log");
    let mut agent = env.running_agent();
    env.mock.set_down(true);
    append(&log, &lines_of("sp", 0..3000));
    assert!(wait_for(Duration::from_secs(10), || follows(&agent, &log)));
    let reply = env.send_ok(&lines((0..1000).map(stateless)));
    assert_eq!(reply["accepted"], 1000);
    std::thread::sleep(Duration::from_millis(500));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0));
    let text = agent.log();
    let spilled: u64 = text
        .lines()
        .filter_map(|l| l.split("saved ").nth(1))
        .filter(|rest| rest.contains("unsent stateless events"))
        .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        spilled,
        1000,
        "spill log: {}",
        text.lines().filter(|l| l.contains("unsent")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(state(&env)["events"]["dropped"].as_u64(), Some(0));
    env.mock.set_down(false);
    let _agent = env.running_agent();
    assert_eq!(missing(&env, "sp", 3000, Duration::from_secs(20)), 0);
    assert!(wait_for(Duration::from_secs(20), || unique(
        originals(&env.mock).into_iter().filter(|l| l.starts_with("msg-")).collect()
    )
    .0 == 1000));
    let (distinct, dups) = unique(originals(&env.mock).into_iter().filter(|l| l.starts_with("msg-")).collect());
    assert_eq!((distinct, dups), (1000, 0));
    assert_eq!(dup_count(&env, "sp").1, 0);
}

/// Rotation with a date suffix that sorts before the live name (`app-20261130.log` under
/// `*.log`), in an outage: the renamed file is followed on under its new name (its rest
/// delivered once), the new file is read from its start.
#[test]
fn a_dateext_rotation_under_a_glob_sends_each_line_once() {
    let (env, logs) = setup(&["*.log"], "");
    let log = logs.join("app.log");
    let _agent = env.running_agent();
    append(&log, &lines_of("dx", 0..500));
    assert_eq!(missing(&env, "dx", 500, Duration::from_secs(10)), 0);
    env.mock.set_down(true);
    append(&log, &lines_of("dx", 500..1000));
    std::thread::sleep(Duration::from_millis(300));
    std::fs::rename(&log, logs.join("app-20261130.log")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    append(&log, &lines_of("dy", 0..500));
    std::thread::sleep(Duration::from_millis(300));
    env.mock.set_down(false);
    assert_eq!(missing(&env, "dx", 1000, Duration::from_secs(10)), 0);
    assert_eq!(missing(&env, "dy", 500, Duration::from_secs(10)), 0);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(dup_count(&env, "dx").1, 0, "the rotated file was sent again");
    assert_eq!(dup_count(&env, "dy").1, 0);
}

/// Four files growing with 512 KiB lines of control characters (×6 in JSON) while the server
/// is down: peak memory.
#[test]
fn four_files_of_escaped_long_lines_during_an_outage_stay_within_32_mib() {
    let (env, logs) = setup(&["*.log"], "logcollector.max_line_bytes = \"512KiB\"");
    let agent = env.running_agent();
    let pid = agent.child.id();
    env.mock.set_down(true);
    let line = "\u{1}".repeat(512 << 10);
    for i in 0..10 {
        for f in 0..4 {
            append(&logs.join(format!("e{f}.log")), &format!("e{f}-{i}-{line}\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let peak = proc_kb(pid, "VmHWM:");
    eprintln!("four files: VmHWM {peak} kB");
    env.mock.set_down(false);
    for f in 0..4 {
        assert_eq!(missing(&env, &format!("e{f}"), 10, Duration::from_secs(30)), 0);
    }
    // Kept whole, the 40 escaped lines would add 40 × 3 MiB = 120 MiB to the 32 – 33 MiB this debug build uses (12 MiB
    // of it the binary's own pages, more since FIM): 40 MiB tells the two apart.
    assert!(peak <= 40 * 1024, "VmHWM {peak} kB");
}
