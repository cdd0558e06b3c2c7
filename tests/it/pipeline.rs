//! The event pipeline end to end: `--send` → ingest socket → batcher / durable queue →
//! uploader → mock, through the real binary over TLS.

use std::time::Duration;

use wazuh_mock_server::{Fault, FaultAction};

use crate::support::*;

const FAST: &str = "events.batch_interval = \"100ms\"";

#[test]
fn ten_thousand_stateless_and_a_thousand_stateful_arrive_exactly_once_in_few_requests() {
    let env = Env::new();
    env.write_config(FAST);
    let _agent = env.running_agent();
    for chunk in 0..10 {
        let reply = env.send_ok(&lines((chunk * 1000..(chunk + 1) * 1000).map(stateless)));
        assert_eq!(reply["accepted"], 1000);
    }
    let reply = env.send_ok(&lines((0..1000).map(stateful)));
    assert_eq!(reply["accepted"], 1000);
    assert!(
        env.mock.wait_until(Duration::from_secs(30), |m| m.stateless_events().len() >= 10_000
            && m.stateful_events().len() >= 1_000),
        "delivered {} stateless, {} stateful",
        env.mock.stateless_events().len(),
        env.mock.stateful_events().len()
    );
    assert_eq!(unique(originals(&env.mock)), (10_000, 0), "every stateless event exactly once");
    assert_eq!(unique(stateful_ids(&env.mock)), (1_000, 0), "every stateful event exactly once");
    let posts = env.mock.requests().iter().filter(|r| r.path.starts_with("/api/v1/events/")).count();
    assert!(posts < 200, "{posts} requests for 11 000 events");
    // Every events request carried the JSON content type and the agent's User-Agent.
    for r in env.mock.requests().iter().filter(|r| r.path.starts_with("/api/v1/events/")) {
        assert_eq!(r.content_type, "application/json");
        assert!(r.user_agent.starts_with("wazuh-agent-rs/"));
    }
    // The agent metadata line names this agent.
    let uuid = std::fs::read_to_string(env.data_dir().join("credentials.json")).unwrap();
    let e = &env.mock.stateless_events()[0];
    assert!(uuid.contains(e.agent["id"].as_str().unwrap()));
    assert_eq!(e.agent["type"], "Endpoint");
}

#[test]
fn malformed_lines_are_rejected_with_their_line_numbers_and_the_rest_delivered() {
    let env = Env::new();
    env.write_config(FAST);
    let _agent = env.running_agent();
    let input = [
        stateless(1),
        String::new(),
        "{not json".into(),
        r#"{"header":{"module":"inventory","collector":"packages","operation":"upsert","id":"x"},"data":{}}"#.into(),
        r#"{"header":{"module":"inventory","collector":"packages","operation":"delete","id":"x"},"data":{}}"#.into(),
        r#"{"header":{"module":"fim","operation":"create","id":""},"data":{}}"#.into(),
        stateful(2),
    ]
    .join("\n");
    let out = env.send(&input);
    assert_eq!(out.status.code(), Some(1), "not everything was accepted");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["accepted"], 2);
    assert_eq!(reply["rejected"], 4);
    let errors: Vec<&str> = reply["errors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert!(errors[0].starts_with("line 3: "), "{errors:?}");
    assert_eq!(errors[1], "line 4: operation 'upsert' is not create|update|delete");
    assert!(errors[2].starts_with("line 5: ") && errors[2].contains("delete"), "{errors:?}");
    assert!(errors[3].starts_with("line 6: ") && errors[3].contains("id is empty"), "{errors:?}");
    assert!(
        env.mock.wait_until(Duration::from_secs(10), |m| originals(m) == ["msg-1"] && stateful_ids(m) == ["pkg-2"])
    );

    // An empty connection gets the empty reply.
    assert_eq!(env.send_ok(""), serde_json::json!({"accepted": 0, "rejected": 0, "errors": []}));
}

#[test]
fn send_says_clearly_when_the_agent_is_not_running() {
    let env = Env::new();
    let out = env.send(&stateless(1));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("not running"), "{}", text(&out));
}

#[test]
fn server_outage_keeps_stateful_and_drops_exactly_the_stateless_overflow() {
    let env = Env::new();
    env.write_config(&format!("{FAST}\nevents.buffer_events = 100\nretry.max = \"300ms\""));
    let _agent = env.running_agent();
    env.mock.set_down(true);
    // 100 fit the buffer; one batch may already be in the uploader's hands.
    env.send_ok(&lines((0..300).map(stateless)));
    env.send_ok(&lines((0..50).map(stateful)));
    std::thread::sleep(Duration::from_millis(300));
    env.mock.set_down(false);
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| m.stateful_events().len() >= 50));
    assert_eq!(unique(stateful_ids(&env.mock)), (50, 0));
    let status = status_json(&env);
    let dropped = status["events"]["dropped"].as_u64().unwrap();
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| originals(m).len() as u64 + dropped >= 300));
    let (got, dups) = unique(originals(&env.mock));
    assert_eq!(dups, 0);
    assert_eq!(got as u64 + dropped, 300, "every stateless event was either delivered or counted as dropped");
    assert!((100..=200).contains(&got), "the buffer of 100 (plus at most one batch in flight) survived: {got}");
    // The newest events are the ones kept (drop_oldest).
    assert!(originals(&env.mock).contains(&"msg-299".to_string()));
}

fn status_json(env: &Env) -> serde_json::Value {
    // state.json is rewritten every 5 s; wait for a fresh one.
    let path = env.dir.path().join("run").join("state.json");
    let before = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    wait_for(Duration::from_secs(8), || std::fs::metadata(&path).and_then(|m| m.modified()).ok() != before);
    let out = env.cmd().arg("--status").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn retry_after_is_honoured() {
    let env = Env::new();
    env.write_config(&format!("{FAST}\nretry.max = \"5s\""));
    let _agent = env.running_agent();
    for (code, path) in [(503, "/api/v1/events/stateless"), (429, "/api/v1/events/stateful")] {
        env.mock.inject(Fault {
            path: path.into(),
            times: 1,
            action: FaultAction::Status { code, retry_after: Some("2".into()), body: None },
        });
    }
    env.send_ok(&lines([stateless(1), stateful(1)]));
    // The mock stores the events before it records the request that carried them: wait for both.
    let accepted = |m: &wazuh_mock_server::MockServer| {
        m.requests().iter().filter(|r| r.path.starts_with("/api/v1/events/") && r.status < 300).count()
    };
    assert!(env.mock.wait_until(Duration::from_secs(15), |m| m.stateless_events().len() == 1
        && m.stateful_events().len() == 1
        && accepted(m) == 2));
    let reqs = env.mock.requests();
    for path in ["/api/v1/events/stateless", "/api/v1/events/stateful"] {
        let times: Vec<_> = reqs.iter().filter(|r| r.path == path).map(|r| (r.status, r.at)).collect();
        assert_eq!(times.len(), 2, "{path}: one refused, one accepted: {times:?}");
        let gap = times[1].1 - times[0].1;
        assert!(gap >= Duration::from_millis(1900), "{path}: resent after {gap:?}, before Retry-After");
    }
}

/// Two uploaders: a stateful batch the server keeps refusing holds up neither the stateless
/// stream nor its own order.
#[test]
fn stateless_events_flow_while_a_stateful_batch_is_being_retried() {
    let env = Env::new();
    env.write_config(&format!("{FAST}\nretry.max = \"300ms\""));
    let _agent = env.running_agent();
    env.mock.inject(Fault {
        path: "/api/v1/events/stateful".into(),
        times: 1_000_000,
        action: FaultAction::Status { code: 503, retry_after: None, body: None },
    });
    env.send_ok(&lines((0..10).map(stateful)));
    let refused = |m: &wazuh_mock_server::MockServer| {
        m.requests().iter().filter(|r| r.path == "/api/v1/events/stateful" && r.status == 503).count()
    };
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| refused(m) >= 1));
    for round in 0..3 {
        env.send_ok(&lines((round * 100..round * 100 + 100).map(stateless)));
    }
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| m.stateless_events().len() >= 300));
    assert_eq!(unique(originals(&env.mock)), (300, 0));
    assert!(env.mock.stateful_events().is_empty());
    let retries = refused(&env.mock);
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| refused(m) > retries), "still retrying");
    env.mock.clear_faults();
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| m.stateful_events().len() >= 10));
    assert_eq!(stateful_ids(&env.mock), (0..10).map(|i| format!("pkg-{i}")).collect::<Vec<_>>());
}

#[test]
fn a_413_splits_the_batch() {
    let env = Env::with(|o| o.max_body = 40_000);
    env.write_config(&format!("{FAST}\nevents.batch_max_bytes = \"1MB\""));
    let _agent = env.running_agent();
    env.send_ok(&lines((0..1000).map(stateless)));
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| m.stateless_events().len() >= 1000));
    assert_eq!(unique(originals(&env.mock)), (1000, 0));
    assert!(env.mock.requests().iter().any(|r| r.status == 413));
}

#[test]
fn a_poison_event_is_isolated_recorded_and_the_rest_delivered() {
    let env = Env::new();
    env.write_config(FAST);
    env.mock.set_poison(Some("msg-37\""));
    let _agent = env.running_agent();
    env.send_ok(&lines((0..100).map(stateless)));
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| m.stateless_events().len() >= 99));
    let (got, dups) = unique(originals(&env.mock));
    assert_eq!((got, dups), (99, 0));
    assert!(!originals(&env.mock).contains(&"msg-37".to_string()));
    let rejected = std::fs::read_to_string(env.data_dir().join("rejected.ndjson")).unwrap();
    let rows: Vec<serde_json::Value> = rejected.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["status"], 400);
    assert_eq!(rows[0]["data"]["event"]["original"], "msg-37");
    assert!(rows[0]["reason"].as_str().unwrap().contains("Invalid event"));
}

#[test]
fn expired_tokens_mid_stream_lose_nothing() {
    let env = Env::new();
    env.write_config(FAST);
    let _agent = env.running_agent();
    for round in 0..5 {
        env.mock.expire_tokens();
        env.send_ok(&lines((round * 200..(round + 1) * 200).map(stateless)));
        env.send_ok(&lines((round * 20..(round + 1) * 20).map(stateful)));
    }
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| m.stateless_events().len() >= 1000
        && m.stateful_events().len() >= 100));
    assert_eq!(unique(originals(&env.mock)), (1000, 0));
    assert_eq!(unique(stateful_ids(&env.mock)), (100, 0));
    assert!(env.mock.requests().iter().any(|r| r.status == 403), "tokens really expired");
}

#[test]
fn kill_9_loses_no_acknowledged_stateful_event() {
    let env = Env::new();
    env.write_config(FAST);
    let mut agent = env.running_agent();
    env.mock.set_down(true);
    let mut acknowledged = Vec::new();
    for round in 0..5 {
        let out = env.send(&lines((round * 100..(round + 1) * 100).map(stateful)));
        if out.status.success() {
            acknowledged.extend((round * 100..(round + 1) * 100).map(|i| format!("pkg-{i}")));
        }
    }
    assert_eq!(acknowledged.len(), 500);
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    env.mock.set_down(false);
    let _agent = env.running_agent();
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| m.stateful_events().len() >= 500));
    let mut got = stateful_ids(&env.mock);
    got.sort();
    got.dedup();
    acknowledged.sort();
    assert_eq!(got, acknowledged);
}

#[test]
fn sigterm_spills_unsent_stateless_events_and_the_next_start_delivers_them() {
    let env = Env::new();
    env.write_config(&format!("{FAST}\nretry.max = \"200ms\""));
    let mut agent = env.running_agent();
    env.mock.set_down(true);
    env.send_ok(&lines((0..500).map(stateless)));
    env.send_ok(&lines((0..50).map(stateful)));
    let started = std::time::Instant::now();
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0), "{}", agent.log());
    assert!(started.elapsed() < Duration::from_secs(10), "stopped within the grace: {:?}", started.elapsed());
    assert!(agent.log().contains("saved"), "{}", agent.log());
    env.mock.set_down(false);
    let _agent = env.running_agent();
    assert!(
        env.mock.wait_until(Duration::from_secs(20), |m| m.stateless_events().len() >= 500
            && m.stateful_events().len() >= 50)
    );
    assert_eq!(unique(originals(&env.mock)), (500, 0));
    assert_eq!(unique(stateful_ids(&env.mock)), (50, 0));
}

/// Measured: with the queue capped, a shutdown spill that saved part of the events logged (and
/// counted) them all as lost. Now the log counts exactly, and the next start delivers the saved ones.
#[test]
fn a_partial_spill_counts_exactly_what_was_saved_and_what_was_lost() {
    let env = Env::new();
    env.write_config(&format!("{FAST}\nevents.batch_max_bytes = \"4KiB\"\nevents.queue_max_bytes = \"16KiB\""));
    let mut agent = env.running_agent();
    env.mock.set_down(true);
    env.send_ok(&lines((0..500).map(stateless)));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0), "{}", agent.log());
    // One line per spill (the batcher's buffer, an uploader's batch in flight):
    // "saved N unsent …" or "saved S of N unsent …; the other L are lost (…)".
    let log = agent.log();
    let (mut saved, mut lost) = (0, 0);
    for line in log.lines().filter(|l| l.contains("unsent stateless events")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "saved").unwrap();
        let n: usize =
            if words[at + 2] == "of" { words[at + 3].parse().unwrap() } else { words[at + 1].parse().unwrap() };
        let s: usize = words[at + 1].parse().unwrap();
        let l = words.iter().position(|w| *w == "other").map_or(0, |i| words[i + 1].parse().unwrap());
        assert_eq!(s + l, n, "{line}");
        (saved, lost) = (saved + s, lost + l);
    }
    assert_eq!(saved + lost, 500, "{log}");
    assert!(saved > 0 && lost > 0, "{log}");
    env.mock.set_down(false);
    let _agent = env.running_agent();
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| m.stateless_events().len() >= saved));
    assert_eq!(unique(originals(&env.mock)), (saved, 0));
}

#[test]
fn gzip_bodies_are_accepted() {
    let env = Env::new();
    env.write_config(&format!("{FAST}\nserver.compression = \"gzip\""));
    let _agent = env.running_agent();
    env.send_ok(&lines((0..100).map(stateless)));
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| m.stateless_events().len() >= 100));
    assert_eq!(unique(originals(&env.mock)), (100, 0));
}

const FALLBACK_WARNING: &str = "set server.compression = \"none\"";

/// `(status, Content-Encoding)` of every events request so far.
fn event_posts(mock: &wazuh_mock_server::MockServer) -> Vec<(u16, String)> {
    let posts = mock.requests().into_iter().filter(|r| r.path.starts_with("/api/v1/events/"));
    posts.map(|r| (r.status, r.content_encoding)).collect()
}

/// The Wazuh 6.0 comms API answers 500 to every gzip body (docs/protocol.md): the agent
/// finds out, sends the same bodies uncompressed, says so once, and tries gzip again after a restart.
#[test]
fn gzip_refused_by_the_server_falls_back_to_uncompressed_once_until_restart() {
    let env = Env::with(|o| o.refuse_gzip = true);
    env.write_config(&format!("{FAST}\nserver.compression = \"gzip\""));
    let mut agent = env.running_agent();
    env.send_ok(&lines((0..100).map(stateless)));
    env.send_ok(&lines((0..20).map(stateful)));
    let delivered =
        |m: &wazuh_mock_server::MockServer, n, k| m.stateless_events().len() >= n && m.stateful_events().len() >= k;
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| delivered(m, 100, 20)), "{}", agent.log());
    // Both uploaders may have probed; the warning comes once, after the first probe was taken.
    assert!(wait_for(Duration::from_secs(5), || agent.log().contains(FALLBACK_WARNING)), "{}", agent.log());
    // More events after the fallback: sent uncompressed from the first attempt.
    let refused_before = event_posts(&env.mock).iter().filter(|(s, _)| *s == 500).count();
    env.send_ok(&lines((100..200).map(stateless)));
    env.send_ok(&lines((20..40).map(stateful)));
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| delivered(m, 200, 40)), "{}", agent.log());
    assert_eq!(unique(originals(&env.mock)), (200, 0), "every stateless event exactly once");
    assert_eq!(unique(stateful_ids(&env.mock)), (40, 0), "every stateful event exactly once");
    let posts = event_posts(&env.mock);
    let refused = posts.iter().filter(|(s, _)| *s == 500).count();
    assert!(refused >= wazuh_agent::session::GZIP_TRIES as usize, "{posts:?}");
    assert_eq!(refused, refused_before, "no gzip body after the fallback: {posts:?}");
    assert!(posts.iter().all(|(s, enc)| (*s == 500) == (enc == "gzip")), "gzip refused, plain taken: {posts:?}");
    assert_eq!(agent.log().matches(FALLBACK_WARNING).count(), 1, "{}", agent.log());
    let want = format!("none (gzip refused by {})", env.mock.comms_url());
    assert!(wait_for(Duration::from_secs(10), || status_json(&env)["compression"] == want.as_str()));

    // Not remembered: after a restart the agent sends gzip again (which this server now takes).
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0));
    env.mock.set_refuse_gzip(false);
    let agent = env.running_agent();
    env.send_ok(&lines((200..300).map(stateless)));
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| m.stateless_events().len() >= 300), "{}", agent.log());
    assert_eq!(unique(originals(&env.mock)), (300, 0));
    assert!(event_posts(&env.mock).iter().any(|(s, enc)| *s < 300 && enc == "gzip"), "{:?}", event_posts(&env.mock));
    assert!(!agent.log().contains(FALLBACK_WARNING));
    assert_eq!(status_json(&env)["compression"], serde_json::Value::Null);
}

/// An outage answers 503 to the uncompressed probe too: gzip stays on.
#[test]
fn an_outage_does_not_turn_gzip_off() {
    let env = Env::new();
    env.write_config(&format!("{FAST}\nserver.compression = \"gzip\""));
    let agent = env.running_agent();
    // Stateful events only: one uploader sends them, one batch at a time, so the refusals run
    // in its order: twice the 5xx in a row that lead to a probe, and the probe, all refused.
    let times = 2 * (wazuh_agent::session::GZIP_TRIES + 1);
    env.mock.inject(Fault {
        path: "/api/v1/events/".into(),
        times,
        action: FaultAction::Status { code: 503, retry_after: None, body: None },
    });
    env.send_ok(&lines((0..10).map(stateful)));
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| m.stateful_events().len() >= 10), "{}", agent.log());
    let posts = event_posts(&env.mock);
    let probes = posts.iter().filter(|(s, enc)| *s == 503 && enc.is_empty()).count();
    assert_eq!(probes, 2, "the uncompressed probes were sent and refused: {posts:?}");
    assert_eq!(posts.iter().filter(|(s, _)| *s == 503).count(), times as usize, "{posts:?}");
    assert!(posts.iter().all(|(s, enc)| *s == 503 || enc == "gzip"), "accepted bodies are gzip: {posts:?}");
    // After the outage, new events go gzip as before.
    env.send_ok(&lines((10..20).map(stateful)));
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| m.stateful_events().len() >= 20), "{}", agent.log());
    assert_eq!(unique(stateful_ids(&env.mock)), (20, 0));
    let posts = event_posts(&env.mock);
    assert!(posts.iter().all(|(s, enc)| *s == 503 || enc == "gzip"), "{posts:?}");
    assert!(!agent.log().contains(FALLBACK_WARNING), "{}", agent.log());
    assert_eq!(status_json(&env)["compression"], serde_json::Value::Null);
}

#[test]
fn status_reports_a_running_agent_and_exit_3_after_it_stops() {
    let env = Env::new();
    let mut agent = env.running_agent();
    env.send_ok(&lines([stateless(1)]));
    let s = status_json(&env);
    assert_eq!(s["running"], true);
    for key in [
        "pid",
        "uuid",
        "server",
        "connected",
        "token_expires_at",
        "updated_at",
        "events",
        "batches",
        "commands",
        "last_error",
        "compression",
    ] {
        assert!(s.get(key).is_some(), "status lacks {key}: {s}");
    }
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
    let out = env.cmd().arg("--status").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["running"], false);
    assert_eq!(s["events"]["sent"], 1);
}

#[test]
fn block_overflow_holds_producers_back_and_loses_nothing() {
    let env = Env::new();
    env.write_config(&format!("{FAST}\nevents.buffer_events = 50\nevents.overflow = \"block\"\nretry.max = \"200ms\""));
    let _agent = env.running_agent();
    env.mock.set_down(true);
    let input = lines((0..10_000).map(stateless));
    let sender = {
        let cmd = env.cmd();
        let input = input.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut cmd = cmd;
            let mut child = cmd
                .arg("--send")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(input.as_bytes());
            drop(stdin);
            child.wait_with_output().unwrap()
        })
    };
    // The agent cannot take 10 000 events into a buffer of 50 while the server is away:
    // the producer is held back (its reply comes only after the server is back).
    assert!(wait_for(Duration::from_secs(5), || status_json(&env)["events"]["buffered"].as_u64().unwrap_or(0) >= 50));
    assert!(!sender.is_finished(), "--send returned while the buffer was full");
    env.mock.set_down(false);
    let out = sender.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // …and once it is back, every event arrives: nothing was dropped.
    assert!(env.mock.wait_until(Duration::from_secs(30), |m| m.stateless_events().len() >= 10_000));
    assert_eq!(unique(originals(&env.mock)), (10_000, 0));
    assert_eq!(status_json(&env)["events"]["dropped"], 0);
}

#[test]
fn a_full_queue_refuses_stateful_events_clearly() {
    let env = Env::new();
    env.write_config(&format!("{FAST}\nevents.queue_max_bytes = \"64KiB\"\nevents.batch_max_bytes = \"16KiB\""));
    let _agent = env.running_agent();
    env.mock.set_down(true);
    let out = env.send(&lines((0..1000).map(stateful)));
    assert_eq!(out.status.code(), Some(1));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let accepted = reply["accepted"].as_u64().unwrap();
    assert!(accepted > 0 && accepted < 1000, "{reply}");
    assert_eq!(reply["rejected"].as_u64().unwrap() + accepted, 1000);
    assert!(reply["errors"][0].as_str().unwrap().contains("queue full"), "{reply}");
    env.mock.set_down(false);
    assert!(env.mock.wait_until(Duration::from_secs(20), |m| m.stateful_events().len() as u64 >= accepted));
    assert_eq!(unique(stateful_ids(&env.mock)).0 as u64, accepted, "exactly the accepted ones are delivered");
}

#[test]
fn events_fail_over_to_the_next_server_when_the_first_goes_down() {
    let env = Env::new();
    env.registered();
    let creds = wazuh_agent::credentials::Credentials::load(&env.data_dir()).unwrap();
    let mut opts = wazuh_mock_server::Options::new(&env.dir.path().join("mock2"));
    opts.password = PASSWORD.into();
    let second = wazuh_mock_server::MockServer::start(opts).expect("second mock server starts");
    second.add_agent(&creds.uuid, creds.key.expose(), &creds.name);
    // One CA file that trusts both servers.
    let cas = env.dir.path().join("cas.pem");
    std::fs::write(&cas, format!("{}{}", env.mock.ca_pem(), second.ca_pem())).unwrap();
    let urls = format!("[{:?}, {:?}]", env.mock.comms_url(), second.comms_url());
    env.write_config(&format!("{FAST}\nserver.url = {urls}\nserver.ca_file = {:?}", cas.display().to_string()));
    let _agent = env.running_agent();
    env.send_ok(&lines((0..10).map(stateless)));
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| m.stateless_events().len() >= 10));
    env.mock.set_down(true);
    env.send_ok(&lines((10..20).map(stateless)));
    env.send_ok(&lines((0..10).map(stateful)));
    // Tokens live 15 minutes: only failover, not a renewal, can bring the events here in time.
    assert!(
        second.wait_until(Duration::from_secs(15), |m| m.stateless_events().len() >= 10
            && m.stateful_events().len() >= 10),
        "the second server got {} stateless, {} stateful events",
        second.stateless_events().len(),
        second.stateful_events().len()
    );
    assert_eq!(unique(originals(&second)), (10, 0));
    assert_eq!(unique(stateful_ids(&second)), (10, 0));
    assert_eq!(second.auth_calls().iter().filter(|c| c.status == 200).count(), 1, "one failover");
}
