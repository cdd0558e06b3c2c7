//! The command channel end to end: mock enqueue → long-poll → executor → result event.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wazuh_mock_server::{Fault, FaultAction, MockServer};

use crate::support::*;

/// A running agent whose mock holds polls for `hold`.
fn setup(hold: Duration) -> (Env, Agent, String) {
    let env = Env::with(|o| o.command_hold = hold);
    env.write_config("events.batch_interval = \"100ms\"");
    let agent = env.running_agent();
    let id = uuid(&env);
    (env, agent, id)
}

#[test]
fn a_command_enqueued_while_idle_is_run_and_reported() {
    let (env, _agent, me) = setup(Duration::from_secs(30));
    env.mock.set_file("g1.yml", b"events:\n  batch_interval: 250ms\nwodle:\n  other: agent\n");
    env.mock.enqueue_command(&me, command("c-1", "set-group", json!({"groups": ["g1"]}), Some(30)));
    let (code, message) = result_of(&env.mock, "c-1", Duration::from_secs(15));
    assert_eq!(code, 0, "{message}");
    assert!(message.contains("groups set to g1") && message.contains("applied events.batch_interval"), "{message}");
    assert!(message.contains("ignored wodle (g1.yml)"), "{message}");
    let shared = env.data_dir().join("shared");
    assert_eq!(
        std::fs::read(shared.join("g1.yml")).unwrap(),
        b"events:\n  batch_interval: 250ms\nwodle:\n  other: agent\n"
    );
    // Events now carry the group.
    env.send_ok(&lines([stateless(1)]));
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| !m.stateless_events().is_empty()));
    assert_eq!(env.mock.stateless_events()[0].agent["groups"], json!(["g1"]));
    // The result went out as a stateful command update.
    let ev = env.mock.stateful_events().into_iter().find(|e| e.header["module"] == "command").unwrap();
    assert_eq!(ev.header, json!({"id": "c-1", "module": "command", "operation": "update"}));
}

#[test]
fn the_408_cycle_keeps_the_channel_open() {
    let (env, _agent, me) = setup(Duration::from_millis(100));
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| {
        m.requests().iter().filter(|r| r.path == "/api/v1/commands" && r.status == 408).count() >= 20
    }));
    env.mock.enqueue_command(&me, command("c-2", "no-such-action", json!({}), None));
    assert_eq!(result_of(&env.mock, "c-2", Duration::from_secs(10)), (1, "Command is not valid".to_string()));
}

#[test]
fn garbage_answers_do_not_stop_polling() {
    let (env, _agent, me) = setup(Duration::from_millis(200));
    env.mock.inject(Fault { path: "/api/v1/commands".into(), times: 3, action: FaultAction::Garbage });
    env.mock.inject(Fault {
        path: "/api/v1/commands".into(),
        times: 2,
        action: FaultAction::Status {
            code: 200,
            retry_after: None,
            body: Some(r#"{"commands": [5, {"x": 1}]}"#.into()),
        },
    });
    env.mock.enqueue_command(&me, command("c-3", "fetch-config", json!({}), None));
    let (code, message) = result_of(&env.mock, "c-3", Duration::from_secs(20));
    assert_eq!(code, 0, "{message}");
    assert!(message.contains("groups set to no group"), "{message}");
}

#[test]
fn a_duplicate_document_id_runs_once() {
    let (env, _agent, me) = setup(Duration::from_millis(300));
    env.mock.enqueue_command(&me, command("c-4", "no-such-action", json!({}), None));
    result_of(&env.mock, "c-4", Duration::from_secs(10));
    env.mock.enqueue_command(&me, command("c-4", "no-such-action", json!({}), None));
    assert!(
        env.mock.wait_until(Duration::from_secs(10), |m| m
            .command_deliveries()
            .iter()
            .filter(|d| d.0 == "c-4")
            .count()
            == 2)
    );
    // A later command's result proves the duplicate was processed (and skipped) before it.
    env.mock.enqueue_command(&me, command("c-4b", "no-such-action", json!({}), None));
    result_of(&env.mock, "c-4b", Duration::from_secs(10));
    assert_eq!(env.mock.command_results().iter().filter(|r| r.0 == "c-4").count(), 1);
}

#[test]
fn set_group_is_all_or_nothing() {
    let (env, _agent, me) = setup(Duration::from_millis(300));
    env.mock.set_file("g1.yml", b"log:\n  level: info\n");
    env.mock.enqueue_command(&me, command("c-5", "set-group", json!({"groups": ["g1"]}), None));
    // set-group starts at most every GROUPS_EVERY (10 s): c-6 and c-7 each wait that long
    // after the previous one started, so each wait below is 10 s plus a loaded machine's share.
    let within = Duration::from_secs(30);
    assert_eq!(result_of(&env.mock, "c-5", within).0, 0);
    env.mock.set_file("g2.yml", b"log:\n  level: debug\n");
    env.mock.enqueue_command(&me, command("c-6", "set-group", json!({"groups": ["g2", "missing"]}), None));
    let (code, message) = result_of(&env.mock, "c-6", within);
    assert_eq!(code, 1);
    assert!(message.contains("missing.yml not found"), "{message}");
    let shared = env.data_dir().join("shared");
    assert!(shared.join("g1.yml").exists() && !shared.join("g2.yml").exists(), "the previous set stays");

    // An invalid file also changes nothing, and says which file and key.
    env.mock.set_file("bad.yml", b"events:\n  overflow: explode\n");
    env.mock.enqueue_command(&me, command("c-7", "set-group", json!({"groups": ["bad"]}), None));
    let (code, message) = result_of(&env.mock, "c-7", within);
    assert_eq!(code, 1);
    assert!(message.contains("bad.yml") && message.contains("events.overflow"), "{message}");
    assert!(shared.join("g1.yml").exists());
}

#[test]
fn group_names_that_escape_the_directory_are_refused() {
    let (env, _agent, me) = setup(Duration::from_millis(300));
    for (i, bad) in ["../../etc/passwd", ".hidden", "a/b", ""].iter().enumerate() {
        let id = format!("c-8-{i}");
        env.mock.enqueue_command(&me, command(&id, "set-group", json!({"groups": [bad]}), None));
        let (code, message) = result_of(&env.mock, &id, Duration::from_secs(10));
        assert_eq!(code, 1);
        assert!(message.starts_with("Command is not valid"), "{message}");
    }
    assert!(!env.mock.requests().iter().any(|r| r.path == "/api/v1/files"), "nothing was downloaded");
}

#[test]
fn a_slow_command_times_out_with_code_3_and_does_not_hold_up_polling() {
    let (env, _agent, me) = setup(Duration::from_millis(300));
    env.mock.set_file("g1.yml", b"{}\n");
    // A 5 s timeout: the next command must be delivered before it ends, even on a loaded machine.
    env.mock.inject(Fault { path: "/api/v1/files".into(), times: 1, action: FaultAction::Delay { ms: 8000 } });
    env.mock.enqueue_command(&me, command("slow", "set-group", json!({"groups": ["g1"]}), Some(5)));
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| m.requests().iter().any(|r| r.path == "/api/v1/files")
        || m.command_deliveries().iter().any(|d| d.0 == "slow")));
    env.mock.enqueue_command(&me, command("next", "no-such-action", json!({}), None));
    // The next command is taken by a poll while the slow one still runs.
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| m.command_deliveries().iter().any(|d| d.0 == "next")));
    assert!(env.mock.command_results().iter().all(|r| r.0 != "slow"), "delivered before the slow one finished");
    let (code, message) = result_of(&env.mock, "slow", Duration::from_secs(20));
    assert_eq!((code, message.as_str()), (3, "timed out after 5s"));
    assert_eq!(result_of(&env.mock, "next", Duration::from_secs(10)).0, 1);
    assert!(!env.data_dir().join("shared").join("g1.yml").exists(), "a timed-out set-group changes nothing");
}

#[test]
fn restart_keeps_the_pid_and_reports_success_from_the_new_process() {
    let (env, mut agent, me) = setup(Duration::from_millis(300));
    let pid = agent.child.id();
    let auths = env.mock.auth_calls().len();
    env.mock.enqueue_command(&me, command("c-9", "restart", json!({}), None));
    let (code, message) = result_of(&env.mock, "c-9", Duration::from_secs(30));
    assert_eq!(code, 0, "{message}");
    assert_eq!(message, format!("agent restarted (pid {pid})"));
    assert!(env.mock.auth_calls().len() > auths, "the new process authenticated");
    assert!(agent.child.try_wait().unwrap().is_none(), "same process still running");
    // And it still works: events flow.
    env.send_ok(&lines([stateless(7)]));
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| originals(m).contains(&"msg-7".to_string())));
    assert_eq!(env.mock.command_results().iter().filter(|r| r.0 == "c-9").count(), 1, "reported once");
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_command_arrives_while_a_large_upload_is_in_progress() {
    let (env, _agent, me) = setup(Duration::from_secs(30));
    let big = lines((0..100_000).map(stateless));
    let sender = {
        let mut cmd = env.cmd();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut child = cmd
                .arg("--send")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(big.as_bytes()).unwrap();
            child.wait().unwrap()
        })
    };
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| m.stateless_events().len() > 1000));
    env.mock.enqueue_command(&me, command("c-10", "no-such-action", json!({}), None));
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| m.command_deliveries().iter().any(|d| d.0 == "c-10")));
    let delivered_at = env.mock.stateless_events().len();
    assert!(delivered_at < 100_000, "delivered while the upload was still going ({delivered_at} of 100000 in)");
    assert!(sender.join().unwrap().success());
    result_of(&env.mock, "c-10", Duration::from_secs(20));
}

/// The window the SysV `reload` test fell into under load: HUP sent the moment the pid file
/// exists must reload the agent, not kill it with HUP's default action.
#[test]
fn a_sighup_as_soon_as_the_pid_file_exists_reloads_and_does_not_kill() {
    let env = Env::new();
    env.registered();
    let pid_file = env.dir.path().join("run/wazuh-agent.pid");
    for round in 0..3 {
        let _ = std::fs::remove_file(&pid_file);
        let mut agent = env.spawn_agent();
        // Spin (no sleep): the point is to signal as early as the pid file can be seen.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::read_to_string(&pid_file).map_or(true, |p| p.trim().is_empty()) {
            assert!(Instant::now() < deadline, "no pid file: {}", agent.log());
            std::thread::yield_now();
        }
        agent.signal(libc::SIGHUP);
        assert!(
            wait_for(Duration::from_secs(20), || agent.log().contains("SIGHUP: configuration reloaded")
                || agent.child.try_wait().unwrap().is_some()),
            "round {round}: {}",
            agent.log()
        );
        assert!(agent.child.try_wait().unwrap().is_none(), "round {round}: HUP killed the agent: {}", agent.log());
        agent.signal(libc::SIGTERM);
        assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0), "{}", agent.log());
    }
}

#[test]
fn sighup_reloads_the_local_file() {
    let (env, agent, _me) = setup(Duration::from_millis(300));
    env.write_config("events.batch_interval = \"2s\"\nserver.request_timeout = \"9s\"");
    agent.signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(10), || agent.log().contains("SIGHUP: configuration reloaded")),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("applied events.batch_interval"), "{log}");
    assert!(log.contains("restart the agent to apply server.request_timeout"), "{log}");
}

#[test]
fn server_strings_cannot_forge_log_lines() {
    let (env, agent, me) = setup(Duration::from_millis(300));
    let id = "c-5\n2026-01-01T00:00:00Z ERROR forged";
    env.mock.enqueue_command(&me, command(id, "no-such-action", json!({}), None));
    result_of(&env.mock, id, Duration::from_secs(10));
    // The id is logged (debug level), escaped onto its own line.
    assert!(
        wait_for(Duration::from_secs(10), || agent.log().contains("c-5\\n2026-01-01T00:00:00Z ERROR forged")),
        "{}",
        agent.log()
    );
    assert!(!agent.log().lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")), "{}", agent.log());
}

#[test]
fn one_answer_with_many_commands_runs_at_most_the_bound_and_polling_goes_on() {
    let (env, agent, me) = setup(Duration::from_millis(300));
    let max = wazuh_agent::commands::MAX_PER_ANSWER;
    let many: Vec<Value> = (0..5000).map(|i| command(&format!("m-{i}"), "no-such-action", json!({}), None)).collect();
    env.mock.enqueue_commands(&me, many);
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| m.command_results().len() >= max));
    // The next command runs: the big answer did not stop the poll or the executor.
    env.mock.enqueue_command(&me, command("after", "no-such-action", json!({}), None));
    assert_eq!(result_of(&env.mock, "after", Duration::from_secs(20)).0, 1);
    let results = env.mock.command_results();
    let from_answer = results.iter().filter(|r| r.0.starts_with("m-")).count();
    assert_eq!(from_answer, max, "only the first {max} entries of the answer are taken");
    assert!(results.iter().any(|r| r.0 == "m-0") && !results.iter().any(|r| r.0 == format!("m-{max}")));
    let log = agent.log();
    assert!(
        log.contains(&format!("{} commands of this answer beyond the first {max} are not run", 5000 - max)),
        "{log}"
    );
}

#[test]
fn an_oversized_commands_answer_is_refused_and_polling_goes_on() {
    let (env, agent, me) = setup(Duration::from_millis(300));
    let limit = wazuh_agent::http::MAX_COMMANDS_BYTES as usize;
    let padding = "x".repeat(limit);
    let body = json!({"commands": [command("huge", "no-such-action", json!({"pad": padding}), None)]}).to_string();
    env.mock.inject(Fault {
        path: "/api/v1/commands".into(),
        times: 1,
        action: FaultAction::Status { code: 200, retry_after: None, body: Some(body) },
    });
    let answered = |m: &MockServer| m.requests().iter().any(|r| r.path == "/api/v1/commands" && r.status == 200);
    assert!(env.mock.wait_until(Duration::from_secs(10), answered), "the big answer was sent");
    assert!(wait_for(Duration::from_secs(10), || agent.log().contains("command poll failed")), "{}", agent.log());
    env.mock.enqueue_command(&me, command("after-huge", "no-such-action", json!({}), None));
    assert_eq!(result_of(&env.mock, "after-huge", Duration::from_secs(20)).0, 1);
    assert!(!env.mock.command_results().iter().any(|r| r.0 == "huge"), "the oversized answer was not read");
}

#[test]
fn a_second_restart_within_a_minute_is_refused_and_the_agent_restarts_once() {
    let (env, mut agent, me) = setup(Duration::from_millis(300));
    env.mock.enqueue_command(&me, command("r-1", "restart", json!({}), None));
    let (code, message) = result_of(&env.mock, "r-1", Duration::from_secs(30));
    assert_eq!(code, 0, "{message}");
    // The old process's held poll may still be open at the mock (which would hand it the next
    // command): wait for two holds to end after the restart.
    let ended =
        |m: &MockServer| m.requests().iter().filter(|r| r.path == "/api/v1/commands" && r.status == 408).count();
    let holds = ended(&env.mock);
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| ended(m) >= holds + 2));
    env.mock.enqueue_command(&me, command("r-2", "restart", json!({}), None));
    let (code, message) = result_of(&env.mock, "r-2", Duration::from_secs(30));
    assert_eq!(code, 1, "{message}");
    assert_eq!(message, "restart refused: at most one restart every 60s");
    // A later command is answered by the same (once restarted) process.
    env.mock.enqueue_command(&me, command("r-3", "no-such-action", json!({}), None));
    result_of(&env.mock, "r-3", Duration::from_secs(20));
    let log = agent.log();
    assert_eq!(log.matches("restart command received, restarting").count(), 1, "{log}");
    assert_eq!(log.matches(" starting as ").count(), 2, "started, then restarted once: {log}");
    assert!(agent.child.try_wait().unwrap().is_none(), "still running");
}

/// Times of the command polls the mock answered with 503.
fn polls_503(m: &MockServer) -> Vec<Instant> {
    m.requests().iter().filter(|r| r.path == "/api/v1/commands" && r.status == 503).map(|r| r.at).collect()
}

/// The 503 polls in a window of `window` that starts at the first one after `seen` polls;
/// waits (on the mock) until a poll after the window's end.
fn polls_in_window(mock: &MockServer, seen: usize, window: Duration) -> usize {
    assert!(mock.wait_until(Duration::from_secs(10), |m| polls_503(m).len() > seen), "no 503 poll");
    let start = polls_503(mock)[seen];
    let after = |m: &MockServer| polls_503(m).iter().any(|t| *t > start + window);
    assert!(mock.wait_until(window + Duration::from_secs(10), after), "polling stopped");
    polls_503(mock)[seen..].iter().filter(|t| **t <= start + window).count()
}

#[test]
fn retry_after_zero_or_past_on_the_command_poll_does_not_switch_backoff_off() {
    let env = Env::with(|o| o.command_hold = Duration::from_millis(300));
    // The floor of the retry policy: Retry-After may not shorten the wait below 500 ms.
    env.write_config("retry.initial = \"500ms\"\nretry.max = \"2s\"");
    let agent = env.running_agent();
    let me = uuid(&env);
    let window = Duration::from_secs(3);
    for retry_after in ["0", "Thu, 01 Jan 1970 00:00:00 GMT"] {
        env.mock.clear_faults();
        let action = FaultAction::Status { code: 503, retry_after: Some(retry_after.into()), body: None };
        env.mock.inject(Fault { path: "/api/v1/commands".into(), times: 1_000_000, action });
        let n = polls_in_window(&env.mock, polls_503(&env.mock).len(), window);
        // At most window / retry.initial + 1 = 7, with slack; before the fix, thousands.
        assert!((2..=9).contains(&n), "Retry-After {retry_after}: {n} polls in {window:?}");
    }
    // Each retry is logged; and once the server is well again, commands flow.
    assert!(agent.log().contains("command poll failed (503"), "{}", agent.log());
    env.mock.clear_faults();
    env.mock.enqueue_command(&me, command("after-503", "no-such-action", json!({}), None));
    assert_eq!(result_of(&env.mock, "after-503", Duration::from_secs(20)).0, 1);
}

/// A server (or proxy) that ends every hold at once: the agent polls again after the retry
/// floor (`retry.initial`, 100 ms in these tests), not in a tight loop.
#[test]
fn a_hold_that_ends_at_once_is_not_polled_in_a_tight_loop() {
    let (env, _agent, me) = setup(Duration::ZERO);
    let holds = |m: &MockServer| -> Vec<Instant> {
        m.requests().iter().filter(|r| r.path == "/api/v1/commands" && r.status == 408).map(|r| r.at).collect()
    };
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| !holds(m).is_empty()), "no poll");
    let start = holds(&env.mock)[0];
    let window = Duration::from_secs(2);
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| holds(m).iter().any(|t| *t > start + window)));
    let polls = holds(&env.mock).iter().filter(|t| **t <= start + window).count();
    // At most window / 100 ms + 1 = 21; before the fix, thousands.
    assert!(polls <= 30, "{polls} polls in {window:?}");
    // Commands still arrive.
    env.mock.enqueue_command(&me, command("q-1", "no-such-action", json!({}), None));
    assert_eq!(result_of(&env.mock, "q-1", Duration::from_secs(10)).0, 1);
}

#[test]
fn sigterm_during_a_restart_stops_the_agent_instead() {
    let (env, mut agent, me) = setup(Duration::from_millis(300));
    // The server stalls every events request: the restart's shutdown waits out its delivery grace.
    let stall = FaultAction::Delay { ms: 20_000 };
    env.mock.inject(Fault { path: "/api/v1/events".into(), times: 1_000, action: stall });
    env.send_ok(&lines([stateless(1)]));
    env.mock.enqueue_command(&me, command("r-term", "restart", json!({}), None));
    assert!(
        wait_for(Duration::from_secs(15), || agent.log().contains("restart command received, restarting")),
        "{}",
        agent.log()
    );
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(30)), Some(0), "stopped as on SIGTERM: {}", agent.log());
    let log = agent.log();
    // The pid stays across an exec: exited means no second instance runs.
    assert_eq!(log.matches(" starting as ").count(), 1, "no second instance started: {log}");
    assert!(log.contains("a stop signal came during the restart; stopping instead"), "{log}");
}

#[test]
fn commands_after_a_restart_in_the_same_answer_run_after_it_once() {
    let (env, mut agent, me) = setup(Duration::from_millis(300));
    let pid = agent.child.id();
    env.mock.set_file("g1.yml", b"{}\n");
    // A slow download: run by the old process, the shutdown would cut it.
    env.mock.inject(Fault { path: "/api/v1/files".into(), times: 1, action: FaultAction::Delay { ms: 500 } });
    let answer = vec![
        command("r-a", "restart", json!({}), None),
        command("sg-a", "set-group", json!({"groups": ["g1"]}), None),
        command("bad-a", "no-such-action", json!({}), None),
    ];
    env.mock.enqueue_commands(&me, answer);
    let (code, message) = result_of(&env.mock, "r-a", Duration::from_secs(30));
    assert_eq!((code, message), (0, format!("agent restarted (pid {pid})")));
    let (code, message) = result_of(&env.mock, "sg-a", Duration::from_secs(20));
    assert_eq!(code, 0, "{message}");
    assert!(message.starts_with("groups set to g1"), "{message}");
    assert_eq!(result_of(&env.mock, "bad-a", Duration::from_secs(20)), (1, "Command is not valid".to_string()));
    // A later command's result: every result queued before it is in.
    env.mock.enqueue_command(&me, command("last", "no-such-action", json!({}), None));
    result_of(&env.mock, "last", Duration::from_secs(20));
    let results = env.mock.command_results();
    for id in ["r-a", "sg-a", "bad-a", "last"] {
        assert_eq!(results.iter().filter(|r| r.0 == id).count(), 1, "{id} reported once: {results:?}");
    }
    let log = agent.log();
    assert_eq!(log.matches(" starting as ").count(), 2, "restarted once: {log}");
    assert!(agent.child.try_wait().unwrap().is_none(), "still running");
}

#[test]
fn a_command_still_queued_at_sigterm_runs_at_the_next_start() {
    let (env, mut agent, me) = setup(Duration::from_millis(300));
    env.mock.set_file("g1.yml", b"{}\n");
    // The first command holds the executor, so the second waits in its queue.
    env.mock.inject(Fault { path: "/api/v1/files".into(), times: 1, action: FaultAction::Delay { ms: 3000 } });
    let answer = vec![
        command("busy", "set-group", json!({"groups": ["g1"]}), Some(60)),
        command("queued", "no-such-action", json!({}), None),
    ];
    env.mock.enqueue_commands(&me, answer);
    assert!(wait_for(Duration::from_secs(10), || agent.log().contains("running command busy")), "{}", agent.log());
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)), Some(0), "{}", agent.log());
    let log = agent.log();
    assert!(log.contains("command queued (no-such-action) is stored"), "{log}");
    assert!(!log.contains("running command queued"), "not run at shutdown: {log}");
    let _again = env.running_agent();
    assert_eq!(result_of(&env.mock, "queued", Duration::from_secs(20)), (1, "Command is not valid".to_string()));
    env.mock.enqueue_command(&me, command("last", "no-such-action", json!({}), None));
    result_of(&env.mock, "last", Duration::from_secs(20));
    let results = env.mock.command_results();
    for id in ["busy", "queued", "last"] {
        assert_eq!(results.iter().filter(|r| r.0 == id).count(), 1, "{id} reported once: {results:?}");
    }
}
