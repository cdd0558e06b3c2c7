//! Red-team reproductions (branch adv-server): each test drives the real agent through its
//! own interfaces (mock server, ingest socket, command line) and measures the outcome.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wazuh_mock_server::MockServer;

use crate::support::*;

/// A group file under 1 MiB whose *scalar* anchor is aliased a few thousand times: the
/// node count stays far under 10 000 (an alias of a scalar counts 1), but the loader clones
/// the 200 KB string for every alias.
pub fn scalar_alias_bomb(scalar: usize, aliases: usize) -> String {
    let mut s = format!("junk: &a \"{}\"\nlist: [", "x".repeat(scalar));
    for i in 0..aliases {
        if i > 0 {
            s.push(',');
        }
        s.push_str("*a");
    }
    s.push_str("]\nevents:\n  batch_interval: 250ms\n");
    s
}

#[test]
fn a_group_file_aliasing_a_large_scalar_does_not_blow_up_memory() {
    let (env, agent, me) = running_with("");
    let pid = agent.child.id();
    let text = scalar_alias_bomb(200_000, 2_500);
    assert!(text.len() < 1 << 20, "{} bytes: under the 1 MiB file limit", text.len());
    let before = proc_kb(pid, "VmHWM:");
    env.mock.set_file("bomb.yml", text.as_bytes());
    env.mock.enqueue_command(&me, command("bomb-1", "set-group", json!({"groups": ["bomb"]}), Some(60)));
    let result = try_result_of(&env.mock, "bomb-1", Duration::from_secs(60));
    let after = proc_kb(pid, "VmHWM:");
    eprintln!("VmHWM before {before} kB, after {after} kB; result {result:?}");
    assert!(after < before + 64 * 1024, "peak RSS grew by {} kB for a {} byte group file", after - before, text.len());
    assert!(
        matches!(&result, Some((1, m)) if m.contains("limit")),
        "the file should be refused naming a limit, got {result:?}"
    );
}

#[test]
fn large_stateless_lines_during_an_outage_stay_within_a_byte_bound() {
    let env = Env::new();
    env.write_config("events.batch_interval = \"50ms\"\nretry.max = \"300ms\"");
    let agent = env.running_agent();
    let pid = agent.child.id();
    env.mock.set_down(true);
    let before = proc_kb(pid, "VmRSS:");
    let big = "y".repeat(1_000_000);
    let line = |i: usize| {
        format!(
            r#"{{"header":{{"module":"logcollector","collector":"file"}},"data":{{"event":{{"original":"{i}-{big}"}}}}}}"#
        )
    };
    let mut accepted = 0;
    for round in 0..10 {
        let reply = env.send_ok(&lines((round * 30..round * 30 + 30).map(line)));
        accepted += reply["accepted"].as_u64().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let (after, peak) = (proc_kb(pid, "VmRSS:"), proc_kb(pid, "VmHWM:"));
    eprintln!("accepted {accepted}; VmRSS before {before} kB, after {after} kB; VmHWM {peak} kB");
    // events.buffer_bytes = "8MiB" by default ("whichever is reached first is full"); every
    // other stage is bounded in bytes too (docs: ARCHITECTURE.md, Invariants).
    assert!(peak <= 32 * 1024, "VmHWM {peak} kB holding 300 MB of buffered events");
    drop(agent);
}

#[test]
fn the_spec_key_events_buffer_bytes_is_accepted() {
    let env = Env::new();
    env.write_config("events.buffer_bytes = \"8MiB\"");
    let out = env.cmd().arg("--check-config").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// `write_bytes`/`wchar` of /proc/<pid>/io.
fn proc_io(pid: u32, field: &str) -> u64 {
    let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) else { return 0 };
    io.lines().find_map(|l| l.strip_prefix(&format!("{field}: "))?.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn long_document_ids_do_not_grow_the_command_store_without_bound() {
    let (env, agent, me) = running_with("");
    let pid = agent.child.id();
    let n = 30;
    let before = proc_io(pid, "wchar");
    let started = Instant::now();
    for i in 0..n {
        let id = format!("{i:04}-{}", "d".repeat(500_000));
        env.mock.enqueue_command(&me, command(&id, "no-such-action", json!({}), Some(60)));
        // The command is refused as malformed (an id over 512 bytes): it has no result, so watch the log.
        let got = wait_for(Duration::from_secs(30), || agent.log().contains(&format!("document_id {i:04}-ddd")));
        assert!(got, "command {i} was not refused: {}", agent.log().lines().last().unwrap_or_default());
    }
    let elapsed = started.elapsed();
    let written = proc_io(pid, "wchar") - before;
    let store = std::fs::metadata(env.data_dir().join("commands.json")).map(|m| m.len()).unwrap_or(0);
    let rss = proc_kb(pid, "VmRSS:");
    eprintln!(
        "{n} commands of ~500 KB ids in {elapsed:?}: commands.json {store} bytes, agent wrote {written} bytes, VmRSS {rss} kB"
    );
    // A 1000-entry store of ids this long would be 500 MB on disk and in memory.
    assert!(store < 1 << 20, "commands.json is {store} bytes after {n} commands");
    assert!(written < 64 << 20, "{written} bytes written for {n} commands ({} per command)", written / n as u64);
}

/// Writes `input` on a fresh ingest connection from a thread; returns the stream (write side
/// still open unless `eof`) and the writer thread.
fn producer(env: &Env, input: Vec<u8>, eof: bool) -> (std::os::unix::net::UnixStream, std::thread::JoinHandle<()>) {
    use std::io::Write;
    let s = std::os::unix::net::UnixStream::connect(env.socket()).expect("connect ingest.sock");
    let mut w = s.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let _ = w.write_all(&input);
        if eof {
            let _ = w.shutdown(std::net::Shutdown::Write);
        }
    });
    (s, t)
}

#[test]
fn rejected_lines_do_not_echo_megabytes_into_the_reply() {
    use std::io::Read;
    let env = Env::new();
    let agent = env.running_agent();
    let pid = agent.child.id();
    let before = proc_kb(pid, "VmHWM:");
    let op = "u".repeat(1_000_000);
    let bad = format!(
        r#"{{"header":{{"module":"inventory","collector":"packages","operation":"{op}","id":"x"}},"data":{{}}}}"#
    );
    let n = 300;
    let input = lines((0..n).map(|_| bad.clone())).into_bytes();
    let (mut s, t) = producer(&env, input, true);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    t.join().unwrap();
    let after = proc_kb(pid, "VmHWM:");
    eprintln!("reply {} bytes for {n} rejected lines; VmHWM {before} -> {after} kB", reply.len());
    assert!(reply.len() < 1 << 20, "the reply line is {} bytes", reply.len());
    assert!(after < before + 64 * 1024, "peak RSS grew by {} kB", after - before);
}

#[test]
fn open_producer_connections_do_not_hold_hundreds_of_megabytes() {
    let env = Env::new();
    let agent = env.running_agent();
    let pid = agent.child.id();
    let before = proc_kb(pid, "VmRSS:");
    let big = "z".repeat(1_000_000);
    let line = format!(r#"{{"header":{{"module":"logcollector"}},"data":{{"event":{{"original":"{big}"}}}}}}"#);
    let mut conns = Vec::new();
    for _ in 0..2 {
        // 400 lines (< 512, the chunk size), and the write side stays open.
        conns.push(producer(&env, lines((0..400).map(|_| line.clone())).into_bytes(), false));
    }
    for (_, t) in std::mem::take(&mut conns) {
        let _ = t.join();
    }
    std::thread::sleep(Duration::from_secs(1));
    let during = proc_kb(pid, "VmRSS:");
    eprintln!("VmRSS before {before} kB, with 2 open producers of 400 x 1 MB lines: {during} kB");
    assert!(during < before + 128 * 1024, "RSS grew by {} kB", during - before);
}

/// The run mode (comms API) with `verify = "full"`: a wrong host name or an unknown CA
/// must never get the agent key (no authentication request reaches the server).
#[test]
fn run_mode_full_verification_refuses_wrong_name_and_unknown_ca() {
    // Wrong name: register with "certificate", then run with the default "full".
    let env = Env::with(|o| o.cert_names = vec!["wazuh-server.example".into()]);
    env.write_config("server.verify = \"certificate\"");
    env.registered();
    env.write_config("");
    let agent = env.spawn_agent();
    std::thread::sleep(Duration::from_secs(3));
    assert!(env.mock.auth_calls().is_empty(), "a wrong-name server got the key: {}", agent.log());
    assert!(agent.log().contains("name"), "{}", agent.log());
    drop(agent);

    // Unknown CA: another mock's CA file.
    let env = Env::new();
    env.registered();
    let other = Env::new();
    env.write_config(&format!("server.ca_file = {:?}", other.mock.ca_file().display().to_string()));
    let agent = env.spawn_agent();
    std::thread::sleep(Duration::from_secs(3));
    let n = env.mock.auth_calls().len();
    assert_eq!(n, 0, "an unknown-CA server got the key {n} times: {}", agent.log());
    let comms = env.mock.requests().iter().filter(|r| r.api == "comms").count();
    assert_eq!(comms, 0);
}

/// Commands polls the mock saw in `window`, from now.
fn polls_during(mock: &MockServer, window: Duration) -> usize {
    let count = || mock.requests().iter().filter(|r| r.path == "/api/v1/commands").count();
    let start = count();
    std::thread::sleep(window);
    count() - start
}

/// A server that answers every poll at once with 200 and nothing to do (an empty list, or
/// only commands already run): the agent re-polls at once, with no floor.
#[test]
fn an_immediate_empty_200_is_not_polled_in_a_tight_loop() {
    use wazuh_mock_server::{Fault, FaultAction};
    let (env, agent, _me) = running_with("retry.initial = \"500ms\"\nretry.max = \"2s\"");
    env.mock.inject(Fault {
        path: "/api/v1/commands".into(),
        times: 200_000,
        action: FaultAction::Status { code: 200, retry_after: None, body: Some(r#"{"commands": []}"#.into()) },
    });
    let n = polls_during(&env.mock, Duration::from_secs(2));
    env.mock.clear_faults();
    eprintln!("{n} polls in 2 s answered 200 with an empty list");
    // With the retry floor (500 ms) at most ~4-5 in 2 s; allow 20.
    assert!(n <= 20, "{n} polls in 2 s: {}/s", n / 2);
    drop(agent);
}

#[test]
fn an_immediate_200_with_only_known_commands_is_not_polled_in_a_tight_loop() {
    use wazuh_mock_server::{Fault, FaultAction};
    let (env, agent, me) = running_with("retry.initial = \"500ms\"\nretry.max = \"2s\"");
    env.mock.enqueue_command(&me, command("once", "no-such-action", json!({}), Some(60)));
    assert!(try_result_of(&env.mock, "once", Duration::from_secs(10)).is_some());
    let body = json!({"commands": [command("once", "no-such-action", json!({}), Some(60))]}).to_string();
    env.mock.inject(Fault {
        path: "/api/v1/commands".into(),
        times: 200_000,
        action: FaultAction::Status { code: 200, retry_after: None, body: Some(body) },
    });
    let log_before = agent.log().len();
    let n = polls_during(&env.mock, Duration::from_secs(2));
    env.mock.clear_faults();
    let logged = agent.log().len() - log_before;
    eprintln!("{n} polls in 2 s answered 200 with a command already run; the log grew by {logged} bytes");
    assert!(n <= 20, "{n} polls in 2 s: {}/s", n / 2);
    drop(agent);
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm field: state is [0], utime [11], stime [12].
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// `logcollector.*` may be set by the server (SPEC §2.1): a wide glob plus the shortest poll
/// interval made the agent hold one descriptor per matched file and re-walk the tree 100
/// times a second. (On a real host the pattern would be "/**/*".) 10ms is refused now; the
/// group file uses the shortest interval still accepted.
#[test]
fn a_group_file_glob_cannot_exhaust_descriptors_or_cpu() {
    let (env, agent, me) = running_with("");
    let pid = agent.child.id();
    let tree = env.dir.path().join("tree");
    for d in 0..30 {
        let dir = tree.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f}.log")), b"").unwrap();
        }
    }
    let yml = format!("logcollector:\n  files: [\"{}/**/*\"]\n  poll_interval: 50ms\n", tree.display());
    env.mock.set_file("wide.yml", yml.as_bytes());
    env.mock.enqueue_command(&me, command("w-1", "set-group", json!({"groups": ["wide"]}), Some(60)));
    let r = try_result_of(&env.mock, "w-1", Duration::from_secs(30));
    assert!(matches!(&r, Some((0, _))), "{r:?}");
    env.mock.enqueue_command(&me, command("w-2", "restart", json!({}), Some(60)));
    let r = try_result_of(&env.mock, "w-2", Duration::from_secs(30));
    assert!(matches!(&r, Some((0, _))), "{r:?} {}", agent.log());
    std::thread::sleep(Duration::from_secs(2));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let cpu = (cpu_ticks(pid) - t0) as f64 / 3.0; // ticks per second (100 = one core)
    eprintln!("open fds {fds}; CPU {cpu:.0}% of a core over 3 s");
    assert!(fds < 512, "{fds} descriptors open");
    assert!(cpu < 50.0, "{cpu:.0}% CPU while idle");
}

/// A hostile management API's error text reaches the fatal message of `--register`: no raw
/// control character (ESC, CR, NEL) and no Unicode line separator may reach the terminal or log.
#[test]
fn register_error_text_from_the_server_cannot_forge_output() {
    use wazuh_mock_server::{Fault, FaultAction};
    let env = Env::new();
    let detail =
        "bad\u{1b}[2J\u{1b}[1;1H\r2026-01-01T00:00:00Z [INFO] (main) registered\u{85}x\u{2028}y\u{2029}z\u{202e}evil";
    env.mock.inject(Fault {
        path: "/agents".into(),
        times: 5,
        action: FaultAction::Status {
            code: 400,
            retry_after: None,
            body: Some(json!({"title": "Bad Request", "detail": detail}).to_string()),
        },
    });
    let out = env.register(&[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("stderr: {stderr:?}");
    let bad: Vec<char> = stderr
        .chars()
        .filter(|c| (c.is_control() && *c != '\n') || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202e}'))
        .collect();
    assert!(bad.is_empty(), "raw characters reached stderr: {bad:?}");
}

/// SPEC §1: "No secret (password, key, token) ever appears in a log line or an error message."
#[test]
fn a_url_with_credentials_is_refused_without_echoing_the_password() {
    let env = Env::new();
    for key in ["server.url", "server.registration_url"] {
        env.write_config(&format!("{key} = \"https://admin:Url-S3cret-Pw@127.0.0.1:55000\""));
        let out = env.cmd().arg("--check-config").output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let t = text(&out);
        assert!(t.contains(key), "{t}");
        assert!(!t.contains("Url-S3cret-Pw"), "{key}: the password is in the error message: {t}");
    }
}

#[test]
fn a_proxy_with_an_invalid_port_is_refused_by_check_config() {
    let env = Env::new();
    env.write_config("server.proxy = \"http://127.0.0.1:99999\"");
    let out = env.cmd().arg("--check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("server.proxy"), "{}", text(&out));
}

/// Odd statuses on the command poll: the agent stays up and polls at a bounded rate.
#[test]
fn odd_statuses_on_the_poll_neither_crash_nor_spin() {
    use wazuh_mock_server::{Fault, FaultAction};
    let (env, mut agent, _me) = running_with("retry.initial = \"200ms\"\nretry.max = \"1s\"");
    let mut report = Vec::new();
    for code in [100u16, 101, 199, 204, 206, 299, 304, 307, 404, 418, 499, 599, 600, 999] {
        env.mock.clear_faults();
        env.mock.inject(Fault {
            path: "/api/v1/commands".into(),
            times: 100_000,
            action: FaultAction::Status { code, retry_after: None, body: Some("{}".into()) },
        });
        let n = polls_during(&env.mock, Duration::from_millis(1500));
        report.push((code, n));
        assert!(agent.child.try_wait().unwrap().is_none(), "agent exited on {code}: {}", agent.log());
    }
    env.mock.clear_faults();
    eprintln!("polls in 1.5 s per status: {report:?}");
    assert!(report.iter().all(|(_, n)| *n <= 30), "{report:?}");
    let _ = agent.wait_exit(Duration::from_millis(1));
}

/// An alias bomb already in the stored set (put there by an agent without the bytes limit)
/// is parsed at every start: a host that the first load pushed into the OOM killer would
/// stay down across restarts. The start refuses it with the same check, naming the limit.
#[test]
fn a_stored_alias_bomb_is_not_expanded_again_at_start() {
    let (env, mut agent, _me) = running_with("");
    agent.signal(libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(15));
    let shared = env.data_dir().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("bomb.yml"), scalar_alias_bomb(200_000, 2_500)).unwrap();
    std::fs::write(shared.join(".groups.json"), r#"["bomb"]"#).unwrap();
    let fresh = env.running_agent();
    let refused = wait_for(Duration::from_secs(10), || fresh.log().contains("bomb.yml is refused"));
    let hwm = proc_kb(fresh.child.id(), "VmHWM:");
    eprintln!("VmHWM of a fresh start with the stored group file: {hwm} kB");
    assert!(hwm < 64 * 1024, "a start peaks at {hwm} kB");
    assert!(refused && fresh.log().contains("limit of 4 MiB"), "{}", fresh.log());
}

/// Deeply nested JSON in every field the ingest parser looks into, on its 256 KiB-stack
/// connection threads: answered line by line, the agent stays up.
#[test]
fn deeply_nested_ingest_lines_are_answered_and_the_agent_stays_up() {
    let env = Env::new();
    let mut agent = env.running_agent();
    let mut input = Vec::new();
    for depth in [100usize, 126, 127, 128, 129, 200, 5000, 400_000] {
        let nest = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let obj = format!("{}{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        input.push(format!(r#"{{"header":{{"module":{nest}}},"data":{{}}}}"#));
        input.push(format!(
            r#"{{"header":{{"module":"inventory","collector":"packages","operation":{nest},"id":"x"}},"data":{{}}}}"#
        ));
        input.push(format!(
            r#"{{"header":{{"module":"inventory","collector":{nest},"operation":"create","id":"x"}},"data":{{}}}}"#
        ));
        input.push(format!(r#"{{"header":{{"module":"m","x":{nest}}},"data":{obj}}}"#));
        input.push(format!(r#"{{"header":{{"module":"inventory","collector":"packages","operation":"create","id":{nest}}},"data":{{}}}}"#));
    }
    let out = env.send(&lines(input));
    let reply = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(agent.child.try_wait().unwrap().is_none(), "agent died: {}", agent.log());
    let v: Value = serde_json::from_str(&reply).unwrap_or_else(|_| panic!("no reply: {}", text(&out)));
    eprintln!("accepted {} rejected {}", v["accepted"], v["rejected"]);
    assert_eq!(v["accepted"].as_u64().unwrap() + v["rejected"].as_u64().unwrap(), 40);
    let _ = agent.wait_exit(Duration::from_millis(1));
}

/// `logcollector.files` may name a FIFO (a server may set it): `File::open` on a FIFO blocks
/// until a writer appears, before the "not a regular file" check.
#[test]
fn a_fifo_in_logcollector_files_does_not_hang_the_agent() {
    let env = Env::new();
    let fifo = env.dir.path().join("trap.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let normal = env.dir.path().join("normal.log");
    std::fs::write(&normal, b"").unwrap();
    let with_fifo = std::env::var_os("ADV_NO_FIFO").is_none();
    let fifo_entry = if with_fifo { format!("{:?}, ", fifo.display().to_string()) } else { String::new() };
    env.write_config(&format!(
        "logcollector.files = [{fifo_entry}{:?}]\nlogcollector.start = \"beginning\"\nevents.batch_interval = \"50ms\"",
        normal.display().to_string()
    ));
    let mut agent = env.running_agent();
    std::fs::write(&normal, b"line-after-fifo\n").unwrap();
    let got = env.mock.wait_until(Duration::from_secs(5), |m| originals(m).iter().any(|o| o == "line-after-fifo"));
    agent.signal(libc::SIGTERM);
    let code = agent.wait_exit(Duration::from_secs(20));
    eprintln!("line from the other file delivered: {got}; exit after SIGTERM: {code:?}");
    assert!(got, "the other file was not read: {}", agent.log());
    assert_eq!(code, Some(0), "{}", agent.log());
}

/// Only `restart` is rate-limited: `set-group` / `fetch-config` may come 100 to an answer,
/// answer after answer, and each one downloads, parses, writes and fsyncs up to 64 × 1 MiB.
#[test]
/// 50 set-group commands of 16 × 1 MB groups: one starts every 10 s (`GROUPS_EVERY`), and an
/// identical set is not written again.
fn set_group_floods_are_rate_limited() {
    let (env, agent, me) = running_with("");
    let pid = agent.child.id();
    let file = format!("# {}\nevents:\n  batch_interval: 250ms\n", "c".repeat(1_000_000));
    let groups: Vec<String> = (0..16).map(|g| format!("g{g}")).collect();
    for g in &groups {
        env.mock.set_file(&format!("{g}.yml"), file.as_bytes());
    }
    let before = proc_io(pid, "wchar");
    let started = Instant::now();
    let cmds: Vec<Value> =
        (0..50).map(|i| command(&format!("flood-{i}"), "set-group", json!({ "groups": groups }), Some(60))).collect();
    let t0 = cpu_ticks(pid);
    env.mock.enqueue_commands(&me, cmds);
    std::thread::sleep(Duration::from_secs(20));
    let elapsed = started.elapsed();
    let written = proc_io(pid, "wchar") - before;
    let cpu = (cpu_ticks(pid) - t0) as f64 / elapsed.as_secs_f64();
    let done = env.mock.command_results().len();
    eprintln!("{done} of 50 set-group commands done in {elapsed:?}; {} MB written; CPU {cpu:.0}%", written >> 20);
    assert!(written < 100 << 20, "{} MB written in {elapsed:?}", written >> 20);
}

/// Issue 12, "Not covered yet": producers that each trickle a byte hold every connection slot (64), within the
/// 30 s read timeout; a producer that then comes with a whole event must still get it through.
#[test]
fn producers_trickling_bytes_into_every_slot_do_not_keep_a_new_producer_out() {
    let env = Env::new();
    env.write_config("events.batch_interval = \"50ms\"");
    let agent = env.running_agent();
    // One byte of a line each, write side kept open: all 64 slots are held.
    let slow: Vec<_> = (0..64).map(|_| producer(&env, b"{".to_vec(), false)).collect();
    // The slots are taken once the 65th connection is turned away (told to retry, or its write cut: broken pipe).
    let full = wait_for(Duration::from_secs(10), || !env.send(&lines([stateless(0)])).status.success());
    assert!(full, "the 64 trickling connections did not take every slot: {}", agent.log());
    // A second without a complete line makes the trickling connections idle (well within their read timeout).
    let mut out = None;
    let through = wait_for(Duration::from_secs(5), || {
        let sent = env.send(&lines([stateless(1)]));
        let through = sent.status.success();
        out = Some(sent);
        through
    });
    let out = out.expect("sent at least once");
    assert!(through, "still turned away after 5 s: {}", text(&out));
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| originals(m).contains(&"msg-1".to_string())));
    drop(slow);
}

/// As above, but each of the 64 connections completes a short line every 300 ms, so none is ever idle for a second:
/// the oldest connections give way instead, so one producer cannot keep every other out for as long as it likes.
#[test]
fn producers_completing_a_line_every_300_ms_in_every_slot_do_not_keep_a_new_producer_out() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::new();
    env.write_config("events.batch_interval = \"50ms\"");
    let agent = env.running_agent();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let chatty: Vec<_> = (0..64)
        .map(|i| {
            let mut s = std::os::unix::net::UnixStream::connect(env.socket()).expect("connect ingest.sock");
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && s.write_all(lines([stateless(1000 + i)]).as_bytes()).is_ok() {
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        })
        .collect();
    let full = wait_for(Duration::from_secs(10), || !env.send(&lines([stateless(0)])).status.success());
    assert!(full, "the 64 chatty connections did not take every slot: {}", agent.log());
    // The chatty connections give way once open for 10 s (ingest's OLDEST).
    let through = wait_for(Duration::from_secs(30), || env.send(&lines([stateless(1)])).status.success());
    stop.store(true, Ordering::Relaxed);
    chatty.into_iter().for_each(|t| t.join().unwrap());
    assert!(through, "a new producer was still turned away after 30 s: {}", agent.log());
}
