//! What a server may set through group files, and what it may send (SPEC §2.1), end to end:
//! mock enqueue → long-poll → executor → result event, then the agent as it runs after.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use serde_json::json;

use crate::support::*;

/// `field` of /proc/<pid>/status, first number (kB for Vm*, the real id for Uid).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in {status}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Waits for the `n`-th log line containing `what` (SIGHUP reloads, restarts).
fn wait_log(agent: &Agent, what: &str, n: usize) -> bool {
    wait_for(Duration::from_secs(15), || agent.log().matches(what).count() >= n)
}

#[test]
fn a_group_file_cannot_set_local_only_keys_even_across_a_restart() {
    let (env, agent, me) = running_with("");
    let pid = agent.child.id();
    let evil = env.dir.path().join("evil");
    std::fs::create_dir(&evil).unwrap();
    let text = format!(
        "agent:\n  user: nobody\n  run_dir: {}\nserver:\n  verify: none\nevents:\n  batch_interval: 250ms\n",
        evil.display()
    );
    env.mock.set_file("g1.yml", text.as_bytes());
    env.mock.enqueue_command(&me, command("g-1", "set-group", json!({"groups": ["g1"]}), Some(60)));
    let (code, message) = result_of(&env.mock, "g-1", Duration::from_secs(30));
    assert_eq!(code, 0, "{message}");
    assert!(message.contains("applied events.batch_interval"), "{message}");
    assert!(
        message.ends_with("; ignored agent.user (g1.yml), agent.run_dir (g1.yml), server.verify (g1.yml)"),
        "{message}"
    );
    assert!(agent.log().contains("group files: ignored agent.user (g1.yml)"), "one warning names them");

    env.mock.enqueue_command(&me, command("g-2", "restart", json!({}), Some(60)));
    assert_eq!(result_of(&env.mock, "g-2", Duration::from_secs(30)), (0, format!("agent restarted (pid {pid})")));
    // The local values hold: same account, same run directory, nothing handed over, TLS checked.
    assert_eq!(proc_status(pid, "Uid:"), unsafe { libc::geteuid() } as u64, "the agent still runs as started");
    assert!(env.dir.path().join("run").join("wazuh-agent.pid").exists());
    assert_eq!(
        std::fs::metadata(&evil).unwrap().uid(),
        unsafe { libc::geteuid() },
        "{} was not chowned",
        evil.display()
    );
    assert_eq!(std::fs::read_dir(&evil).unwrap().count(), 0);
    assert!(!agent.log().contains("server.verify = \"none\""), "{}", agent.log());
    // The settable key did apply at the new start: reloading the same files changes nothing
    // (without the group file the running 250ms would go back to the local 100ms).
    agent.signal(libc::SIGHUP);
    assert!(wait_log(&agent, "SIGHUP: configuration reloaded; no setting changed", 1), "{}", agent.log());
}

#[test]
fn with_remote_config_false_group_files_are_stored_but_not_applied() {
    let (env, agent, me) = running_with("agent.remote_config = false");
    env.mock.set_file("g1.yml", b"events:\n  batch_interval: 250ms\nlog:\n  level: error\n");
    env.mock.enqueue_command(&me, command("r-1", "set-group", json!({"groups": ["g1"]}), Some(60)));
    let (code, message) = result_of(&env.mock, "r-1", Duration::from_secs(30));
    assert_eq!(code, 0, "{message}");
    assert_eq!(
        message,
        "groups set to g1; no setting changed; their settings are not applied (agent.remote_config = false)"
    );
    assert!(env.data_dir().join("shared").join("g1.yml").exists(), "the file is stored all the same");

    // Not at the next start either (log.level = error there would hide the info lines below).
    env.mock.enqueue_command(&me, command("r-2", "restart", json!({}), Some(60)));
    assert_eq!(result_of(&env.mock, "r-2", Duration::from_secs(30)).0, 0);
    assert!(wait_log(&agent, "agent.remote_config = false: the server's group files are not applied", 2));
    agent.signal(libc::SIGHUP);
    assert!(wait_log(&agent, "SIGHUP: configuration reloaded; no setting changed", 1), "{}", agent.log());

    // Switched on locally, the stored files apply at the next SIGHUP.
    env.write_config("events.batch_interval = \"100ms\"\nagent.remote_config = true\nlog.level = \"info\"");
    agent.signal(libc::SIGHUP);
    let applied = "SIGHUP: configuration reloaded; applied agent.remote_config, events.batch_interval, log.level";
    assert!(wait_log(&agent, applied, 1), "{}", agent.log());
}

/// The 591-byte "billion laughs" file.
const BILLION_LAUGHS: &str = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
";

#[test]
fn hostile_group_files_are_refused_naming_the_limit_and_change_nothing() {
    let (env, mut agent, me) = running_with("");
    let pid = agent.child.id();
    env.mock.set_file("g1.yml", b"log:\n  level: info\n");
    env.mock.enqueue_command(&me, command("h-0", "set-group", json!({"groups": ["g1"]}), Some(60)));
    assert_eq!(result_of(&env.mock, "h-0", Duration::from_secs(30)).0, 0);

    env.mock.set_file("lol.yml", BILLION_LAUGHS.as_bytes());
    env.mock.enqueue_command(&me, command("h-1", "set-group", json!({"groups": ["lol"]}), Some(60)));
    let (code, message) = result_of(&env.mock, "h-1", Duration::from_secs(30));
    assert_eq!(
        (code, message.as_str()),
        (1, "group file lol.yml is refused: its aliases expand past the limit of 10000 nodes")
    );

    // The mock records paths without their query: count the downloads around each command.
    let downloads = || env.mock.requests().iter().filter(|r| r.path == "/api/v1/files").count();
    let before = downloads();
    let mut big = b"log:\n  level: debug\n".to_vec();
    big.resize((1 << 20) + 1, b'#');
    env.mock.set_file("big.yml", &big);
    env.mock.enqueue_command(&me, command("h-2", "set-group", json!({"groups": ["big"]}), Some(60)));
    let (code, message) = result_of(&env.mock, "h-2", Duration::from_secs(30));
    assert_eq!(code, 1);
    assert!(message.starts_with("group file big.yml is refused: the answer is larger than the limit of 1048576 bytes"));
    assert_eq!(downloads() - before, 1, "an oversized file is not fetched again");

    let many: Vec<String> = (0..65).map(|i| format!("m{i}")).collect();
    env.mock.enqueue_command(&me, command("h-3", "set-group", json!({"groups": many}), Some(60)));
    assert_eq!(
        result_of(&env.mock, "h-3", Duration::from_secs(30)),
        (1, "refused: 65 groups, more than the limit of 64".to_string())
    );
    assert_eq!(downloads() - before, 1, "nothing was downloaded for 65 groups");

    // Nothing changed, the agent is up and small (a debug build runs in a few tens of MB;
    // expanding the aliases took 2.9 GB), and it still takes commands.
    let shared = env.data_dir().join("shared");
    assert_eq!(std::fs::read(shared.join("g1.yml")).unwrap(), b"log:\n  level: info\n");
    assert!(!shared.join("lol.yml").exists() && !shared.join("big.yml").exists());
    assert!(agent.child.try_wait().unwrap().is_none(), "{}", agent.log());
    let peak_kb = proc_status(pid, "VmHWM:");
    assert!(peak_kb < 256 * 1024, "peak RSS {peak_kb} kB");
    env.mock.enqueue_command(&me, command("h-4", "no-such-action", json!({}), Some(60)));
    assert_eq!(result_of(&env.mock, "h-4", Duration::from_secs(30)).0, 1);
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
}
