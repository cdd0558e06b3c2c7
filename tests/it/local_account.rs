//! Issue 12, finding 2: the `agent.user` account owns the data and run directories after a
//! run; links it plants there must not make root (the next start) write through them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

const PRECIOUS: &str = "root's file, not the agent's\n";

fn nobody() -> wazuh_agent::privileges::Account {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root (CI runs as root)");
    wazuh_agent::privileges::resolve("nobody", None).expect("Debian has the account nobody")
}

/// An agent that ran once as `nobody` and stopped: its directories now belong to nobody.
fn after_a_run_as_nobody(extra: impl FnOnce(&Env) -> String) -> Env {
    let env = Env::new();
    let extra = extra(&env);
    // The agent's own paths sit under the test's temp dir: let the user traverse it.
    std::fs::set_permissions(env.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.write_config(&format!("agent.user = \"nobody\"\n{extra}"));
    let mut agent = env.running_agent();
    env.send_ok(&lines([stateful(1)]));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(0), "{}", agent.log());
    assert_eq!(std::fs::metadata(env.data_dir().join("queue")).unwrap().uid(), nobody().uid);
    env
}

/// A root-owned file outside the agent's directories, and its content.
fn victim(env: &Env, name: &str) -> PathBuf {
    let path = env.dir.path().join(name);
    std::fs::write(&path, PRECIOUS).unwrap();
    path
}

/// What the account can do in its own directory: put a link to `target` at `at`, as its file.
fn plant(at: &Path, target: &Path) {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).unwrap();
    let a = nobody();
    std::os::unix::fs::lchown(at, Some(a.uid), Some(a.gid)).unwrap();
}

fn unchanged(victim: &Path) -> bool {
    let meta = std::fs::metadata(victim).unwrap();
    std::fs::read_to_string(victim).unwrap() == PRECIOUS && meta.uid() == 0 && meta.mode() & 0o7777 == 0o644
}

#[test]
fn a_link_at_the_pid_file_stops_the_start_and_root_writes_nothing_through_it() {
    let env = after_a_run_as_nobody(|_| String::new());
    let target = victim(&env, "victim-pid");
    let pid_file = env.dir.path().join("run/wazuh-agent.pid");
    plant(&pid_file, &target);
    let mut agent = env.spawn_agent();
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(1), "{}", agent.log());
    assert!(unchanged(&target), "the victim was written through the pid file link");
    let refused = format!("{} is a symbolic link; refusing to follow it", pid_file.display());
    assert!(agent.log().contains(&refused), "{}", agent.log());
}

#[test]
fn a_link_at_the_log_file_stops_the_start() {
    let log = |env: &Env| env.data_dir().join("agent.log");
    let env = after_a_run_as_nobody(|env| {
        std::fs::create_dir_all(env.data_dir()).unwrap();
        format!("log.file = {:?}", log(env).display().to_string())
    });
    let target = victim(&env, "victim-log");
    plant(&log(&env), &target);
    let mut agent = env.spawn_agent();
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(1), "{}", agent.log());
    assert!(unchanged(&target), "the victim was appended to through the log file link");
    let refused = format!("{} is a symbolic link; refusing to follow it", log(&env).display());
    assert!(agent.log().contains(&refused), "{}", agent.log());
}

#[test]
fn links_at_queue_segments_and_the_cursor_are_removed_unfollowed_and_the_agent_runs() {
    let env = after_a_run_as_nobody(|_| String::new());
    let queue = env.data_dir().join("queue");
    let last = std::fs::read_dir(&queue)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.ends_with(".seg"))
        .max()
        .expect("a segment");
    let victims: Vec<(PathBuf, PathBuf)> = [last.as_str(), "00000000000000000099.seg", "cursor"]
        .iter()
        .enumerate()
        .map(|(i, name)| (queue.join(name), victim(&env, &format!("victim-queue-{i}"))))
        .collect();
    for (at, target) in &victims {
        plant(at, target);
    }
    let agent = env.running_agent();
    let changed: Vec<_> = victims.iter().filter(|(_, t)| !unchanged(t)).map(|(at, _)| at).collect();
    assert!(changed.is_empty(), "written through the links at {changed:?}");
    for (at, _) in &victims {
        let refused = format!("{} is a symbolic link; refusing to follow it", at.display());
        assert!(agent.log().contains(&refused), "{refused}: {}", agent.log());
    }
    // The queue still works: a stateful event goes through.
    env.send_ok(&lines([stateful(2)]));
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| stateful_ids(m).contains(&"pkg-2".to_string())));
    assert!(victims.iter().all(|(_, t)| unchanged(t)));
}

#[test]
fn links_at_state_json_and_its_temp_file_are_not_followed_by_a_root_agent() {
    // The account owns the run directory from an earlier run; now root runs without agent.user.
    let env = after_a_run_as_nobody(|_| String::new());
    env.write_config("");
    let run = env.dir.path().join("run");
    let state_victim = victim(&env, "victim-state");
    plant(&run.join("state.json"), &state_victim);
    // The temp file's name carries the writer's pid: plant it for every pid the agent may get.
    let temp_victim = victim(&env, "victim-temp");
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid").unwrap().trim().parse().unwrap();
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let candidates: Vec<u32> = (1..=8000).map(|i| (last + i) % max).filter(|p| *p > 1).collect();
    for pid in &candidates {
        plant(&run.join(format!(".state.json.tmp.{pid}")), &temp_victim);
    }
    let mut planted = std::time::SystemTime::now();
    let agent = env.running_agent();
    let pid = agent.child.id();
    if !candidates.contains(&pid) {
        // Other processes took the foreseen pids: plant at the agent's own now; state.json is
        // rewritten every 5 s, through that temp file again.
        planted = std::time::SystemTime::now();
        plant(&run.join(format!(".state.json.tmp.{pid}")), &temp_victim);
    }
    let state = run.join("state.json");
    let rewritten = |m: std::fs::Metadata| m.is_file() && m.modified().is_ok_and(|t| t > planted);
    assert!(
        wait_for(Duration::from_secs(20), || std::fs::symlink_metadata(&state).is_ok_and(rewritten)),
        "state.json is the agent's own file, written after the links were planted"
    );
    assert!(unchanged(&state_victim) && unchanged(&temp_victim), "a victim was written through a link");
    assert!(std::fs::read_to_string(&state).unwrap().contains("\"pid\""));
}

/// Runs the SysV script's `stop` in a pid namespace of its own (so that a `kill -TERM -1`
/// could only reach that namespace), with `pid` in every pid file it may read: the agent's and
/// the old respawn wrapper's in the run directory (the account's) and the respawn loop's in
/// `run.init` (root's). Returns what was signalled: "init" (pid 1 of the namespace) and/or
/// "victim" (a process the test started).
fn sysv_stop_with_pid_file(env: &Env, pid: &str) -> String {
    let script = r#"
        trap 'echo init-signalled' TERM
        # The victim looks like the agent at first sight (argv[0] is its binary), as a root
        # `wazuh-agent --send` would: only `BIN --config CONFIG` itself may be signalled.
        perl -e 'exec { "/bin/sleep" } @ARGV' "$WAZUH_AGENT_BIN" 600 & victim=$!
        [ "$PID" = victim ] && PID=$victim
        mkdir -p "$RUN" "$RUN.init" && chmod 0700 "$RUN.init"
        for f in "$RUN/wazuh-agent.pid" "$RUN/wazuh-agent-respawn.pid" "$RUN.init/respawn.pid"; do
            echo "$PID" >"$f"
        done
        sh "$SCRIPT" stop
        state=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$victim/status" 2>/dev/null)
        case $state in '' | Z) echo victim-signalled ;; *) kill -KILL "$victim" ;; esac
    "#;
    let out = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c", script])
        .env("PID", pid)
        .env("RUN", env.dir.path().join("run"))
        .env("SCRIPT", concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/init.d/wazuh-agent"))
        .env("WAZUH_AGENT_BIN", bin())
        .env("WAZUH_AGENT_CONFIG", &env.config)
        .env("WAZUH_AGENT_DEFAULTS", env.dir.path().join("no-defaults"))
        .output()
        .expect("unshare (util-linux) runs");
    text(&out)
}

#[test]
fn the_sysv_script_signals_no_process_but_the_agent_named_in_a_pid_file() {
    let env = Env::new();
    for pid in ["-1", "1", "victim", "0", "12abc"] {
        let out = sysv_stop_with_pid_file(&env, pid);
        assert!(!out.contains("signalled"), "pid file {pid:?}: {out}");
        // The agent's own pid file, in the account's run_dir, is never read (its pid comes from --status).
        let refused = format!(
            "{} does not name the agent or its respawn loop; not signalling it",
            env.dir.path().join("run.init/respawn.pid").display()
        );
        assert!(out.contains(&refused), "pid file {pid:?}: {out}");
        assert!(!out.contains("run/wazuh-agent.pid"), "pid file {pid:?}: {out}");
    }
}

/// Stops the agent the SysV script started, even when the test fails half-way.
struct SysvStop<'a>(&'a Env);

impl Drop for SysvStop<'_> {
    fn drop(&mut self) {
        let _ = sysv_script(self.0, "stop").output();
    }
}

#[test]
fn the_respawn_loop_does_not_write_its_pid_through_a_link() {
    let env = Env::new();
    env.registered();
    let target = victim(&env, "victim-loop");
    let init_dir = env.dir.path().join("run.init");
    std::fs::create_dir(&init_dir).unwrap();
    std::fs::set_permissions(&init_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let pid_file = init_dir.join("respawn.pid");
    std::os::unix::fs::symlink(&target, &pid_file).unwrap();
    let _stop = SysvStop(&env);
    let out = sysv_script(&env, "start").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(unchanged(&target), "the respawn loop wrote its pid through the link");
    assert!(std::fs::symlink_metadata(&pid_file).unwrap().is_file(), "the loop's own file");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("\0respawn\0"), "{cmdline:?}");
}

/// A root-owned file in a directory of root's, mode `mode`, holding [`PRECIOUS`].
fn victim_in(dir: &Path, name: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, PRECIOUS).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// `ln target at`, run as `nobody` (the kernel's fs.protected_hardlinks decides what it may link).
fn hard_link_as_nobody(target: &Path, at: &Path) {
    use std::os::unix::process::CommandExt;
    let a = nobody();
    let out = std::process::Command::new("ln").arg(target).arg(at).uid(a.uid).gid(a.gid).output().unwrap();
    assert!(out.status.success(), "nobody could not link: {}", text(&out));
}

#[test]
fn a_hard_link_the_account_makes_in_data_dir_does_not_give_it_a_root_file() {
    let env = after_a_run_as_nobody(|_| String::new());
    // A root file the account may link under fs.protected_hardlinks = 1 (it can read and
    // write it, but must never own it: an owner can chmod it and keep it from root).
    let target = victim_in(&env.dir.path().join("root-owned"), "shared-scratch", 0o666);
    hard_link_as_nobody(&target, &env.data_dir().join("notes"));
    let agent = env.running_agent();
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "root chowned the linked file to the account during the hand-over");
    // Skipped, not refused (a hard link may be an admin's backup too), and said so.
    let skipped =
        format!("{} is not handed to agent.user: owner uid 0, 2 links", env.data_dir().join("notes").display());
    assert!(agent.log().contains(&skipped), "{}", agent.log());
}

#[test]
fn a_hard_link_at_the_pid_file_is_not_truncated_written_or_chowned_by_root() {
    let env = after_a_run_as_nobody(|_| String::new());
    let target = victim_in(&env.dir.path().join("root-owned"), "precious", 0o644);
    // What the account does where fs.protected_hardlinks = 0 (the kernel's default; systemd
    // sets 1, OpenRC and SysV systems may not): link any root file on the run_dir filesystem.
    // Root makes the link here because this host sets 1; the agent cannot tell the difference.
    let pid_file = env.dir.path().join("run/wazuh-agent.pid");
    let _ = std::fs::remove_file(&pid_file);
    std::fs::hard_link(&target, &pid_file).unwrap();
    let mut agent = env.spawn_agent();
    let code = agent.wait_exit(Duration::from_secs(15));
    let content = std::fs::read_to_string(&target).unwrap();
    let meta = std::fs::metadata(&target).unwrap();
    assert!(
        content == PRECIOUS && meta.uid() == 0,
        "root wrote {content:?} into the linked file and left it to uid {}: {}",
        meta.uid(),
        agent.log()
    );
    // Refused, as a symbolic link there is: the agent never links its pid file, so someone else did.
    let refused = format!("{} is not a regular file with one link of root's or agent.user's", pid_file.display());
    assert!(code == Some(1) && agent.log().contains(&refused), "exit {code:?}: {}", agent.log());
}

#[test]
fn a_link_above_the_log_file_does_not_make_root_append_to_or_chown_a_file_elsewhere() {
    let logs = |env: &Env| env.data_dir().join("logs");
    let env = after_a_run_as_nobody(|env| {
        std::fs::create_dir_all(logs(env)).unwrap();
        format!("log.file = {:?}", logs(env).join("agent.log").display().to_string())
    });
    let elsewhere = env.dir.path().join("root-logs");
    let target = victim_in(&elsewhere, "agent.log", 0o644);
    // As the account: its own directory `logs` becomes a link to root's directory.
    std::fs::remove_dir_all(logs(&env)).unwrap();
    plant(&logs(&env), &elsewhere);
    let mut agent = env.spawn_agent();
    let _ = wait_for(Duration::from_secs(15), || env.socket().exists() || agent.child.try_wait().unwrap().is_some());
    let meta = std::fs::metadata(&target).unwrap();
    let content = std::fs::read_to_string(&target).unwrap();
    assert!(
        unchanged(&target),
        "root appended to {} (now {} bytes) and left it to uid {}",
        target.display(),
        content.len(),
        meta.uid()
    );
    let refused =
        format!("{} passes through a symbolic link in a directory another account can write", logs(&env).display());
    assert_eq!(agent.wait_exit(Duration::from_secs(15)), Some(1), "{}", agent.log());
    assert!(agent.log().contains(&refused), "{}", agent.log());
}

#[test]
fn a_run_dir_inside_data_dir_swapped_for_a_link_does_not_make_root_touch_a_file_elsewhere() {
    let run = |env: &Env| env.data_dir().join("run");
    // One run as nobody with run_dir inside data_dir (after_a_run_as_nobody waits on the default socket).
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.write_config(&format!("agent.user = \"nobody\"\nagent.run_dir = {:?}", run(&env).display().to_string()));
    env.registered();
    let mut first = env.spawn_agent();
    assert!(wait_for(Duration::from_secs(15), || run(&env).join("ingest.sock").exists()), "{}", first.log());
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(Duration::from_secs(15)), Some(0), "{}", first.log());
    assert_eq!(std::fs::metadata(run(&env)).unwrap().uid(), nobody().uid);
    let elsewhere = env.dir.path().join("root-run");
    let target = victim_in(&elsewhere, "wazuh-agent.pid", 0o644);
    // As the account: its own directory `run` (in data_dir, which it owns) becomes a link.
    std::fs::remove_dir_all(run(&env)).unwrap();
    plant(&run(&env), &elsewhere);
    let mut agent = env.spawn_agent();
    let code = agent.wait_exit(Duration::from_secs(15));
    assert!(target.exists(), "root deleted {} (exit {code:?}): {}", target.display(), agent.log());
    assert!(unchanged(&target), "root wrote through the linked run_dir: {}", agent.log());
    let refused =
        format!("{} passes through a symbolic link in a directory another account can write", run(&env).display());
    assert!(code == Some(1) && agent.log().contains(&refused), "exit {code:?}: {}", agent.log());
}

/// The account swaps `a` and `b` (renameat2 RENAME_EXCHANGE) without pause until the returned flag is set.
fn swapping(a: &Path, b: &Path) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let cs = |p: &Path| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let (a, b, flag) = (cs(a), cs(b), stop.clone());
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            // SAFETY: two NUL-terminated paths that outlive the call.
            unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        }
    });
    (stop, thread)
}

#[test]
fn a_run_dir_inside_data_dir_swapped_for_a_link_at_every_start_does_not_make_root_remove_or_bind_elsewhere() {
    let run = |env: &Env| env.data_dir().join("run");
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.write_config(&format!("agent.user = \"nobody\"\nagent.run_dir = {:?}", run(&env).display().to_string()));
    env.registered();
    let mut first = env.spawn_agent();
    assert!(wait_for(Duration::from_secs(15), || run(&env).join("ingest.sock").exists()), "{}", first.log());
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(Duration::from_secs(15)), Some(0), "{}", first.log());
    let elsewhere = env.dir.path().join("root-run");
    let target = victim_in(&elsewhere, "ingest.sock", 0o644);
    let swap = env.data_dir().join("run.swap");
    plant(&swap, &elsewhere);
    // The account swaps its run directory with the link again and again, and kills its agent for root to restart.
    let (stop, swapper) = swapping(&run(&env), &swap);
    let mut broke = None;
    for start in 0..30 {
        let mut agent = env.spawn_agent();
        wait_for(Duration::from_secs(10), || {
            run(&env).join("ingest.sock").exists() || agent.child.try_wait().unwrap().is_some()
        });
        agent.signal(libc::SIGKILL);
        let _ = agent.wait_exit(Duration::from_secs(5));
        if !target.exists() || !unchanged(&target) {
            broke = Some(format!("start {start}: {}", agent.log()));
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(broke.is_none(), "root removed or replaced {}: {}", target.display(), broke.unwrap_or_default());
}

#[test]
fn a_hard_link_at_a_queue_segment_is_not_truncated_or_appended_to() {
    let env = after_a_run_as_nobody(|_| String::new());
    let queue = env.data_dir().join("queue");
    let segments = std::fs::read_dir(&queue).unwrap().filter_map(|e| e.unwrap().file_name().into_string().ok());
    let last = segments.filter(|n| n.ends_with(".seg")).max().expect("a segment");
    let target = victim_in(&env.dir.path().join("root-owned"), "precious", 0o644);
    // As at the pid file: where fs.protected_hardlinks = 0 the account can link any root file there.
    std::fs::remove_file(queue.join(&last)).unwrap();
    std::fs::hard_link(&target, queue.join(&last)).unwrap();
    let mut agent = env.spawn_agent();
    let up = wait_for(Duration::from_secs(15), || env.socket().exists() || agent.child.try_wait().unwrap().is_some());
    if up && env.socket().exists() {
        // An event for the active segment, which the agent opened as root.
        let _ = env.send(&lines([stateful(2)]));
    }
    let (content, meta) = (std::fs::read(&target).unwrap(), std::fs::metadata(&target).unwrap());
    assert!(
        content == PRECIOUS.as_bytes() && meta.uid() == 0,
        "root left {} bytes in the linked file, owned by uid {}: {}",
        content.len(),
        meta.uid(),
        agent.log()
    );
    let refused = format!("{} is not a regular file with one link; refusing it", queue.join(&last).display());
    assert!(agent.log().contains(&refused), "{refused}: {}", agent.log());
}

#[test]
fn a_huge_sparse_file_planted_as_a_queue_segment_does_not_exhaust_roots_memory() {
    let env = after_a_run_as_nobody(|_| String::new());
    let seg = env.data_dir().join("queue/00000000000000000099.seg");
    // 512 MiB that cost the account no disk: root read every segment whole at start.
    std::fs::File::create(&seg).unwrap().set_len(512 << 20).unwrap();
    std::os::unix::fs::chown(&seg, Some(nobody().uid), Some(nobody().gid)).unwrap();
    let mut agent = env.spawn_agent();
    let status = format!("/proc/{}/status", agent.child.id());
    let hwm = || -> u64 {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let line = text.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or_default().to_string();
        line.split_whitespace().nth(1).and_then(|kb| kb.parse().ok()).unwrap_or(0)
    };
    let mut peak = 0;
    wait_for(Duration::from_secs(15), || {
        peak = peak.max(hwm());
        peak > 256 << 10 || env.socket().exists() || agent.child.try_wait().unwrap().is_some()
    });
    agent.signal(libc::SIGKILL);
    assert!(peak <= 256 << 10, "root's agent grew to {peak} KiB reading the planted segment");
    let refused = format!("{} is over 16777216 bytes; refusing it", seg.display());
    assert!(agent.log().contains(&refused), "{refused}: {}", agent.log());
}

#[test]
fn a_queue_directory_swapped_for_a_link_during_recovery_does_not_make_root_touch_another_directory() {
    let env = after_a_run_as_nobody(|_| String::new());
    // A directory of root's with links in it (as /etc/ssl/certs or *.target.wants are).
    let victims = env.dir.path().join("root-links");
    std::fs::create_dir(&victims).unwrap();
    for i in 0..20 {
        std::os::unix::fs::symlink("/etc/hostname", victims.join(format!("link-{i}"))).unwrap();
    }
    let listing = || {
        let mut names: Vec<_> = std::fs::read_dir(&victims).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    let before = listing();
    // The account swaps its queue directory with a link to them, again and again (renameat2 RENAME_EXCHANGE),
    // and kills its agent so that root starts it again (as a respawn loop or systemd does).
    let (queue, swap) = (env.data_dir().join("queue"), env.data_dir().join("queue.swap"));
    plant(&swap, &victims);
    let (stop, swapper) = swapping(&queue, &swap);
    let mut damaged = None;
    for start in 0..30 {
        let mut agent = env.spawn_agent();
        wait_for(Duration::from_secs(10), || env.socket().exists() || agent.child.try_wait().unwrap().is_some());
        agent.signal(libc::SIGKILL);
        let _ = agent.wait_exit(Duration::from_secs(5));
        let _ = std::fs::remove_file(env.socket());
        if listing() != before {
            damaged = Some((start, agent.log()));
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    let (start, log) = damaged.map(|(s, l)| (s.to_string(), l)).unwrap_or_default();
    assert!(listing() == before, "start {start}: root changed {} to {:?}: {log}", victims.display(), listing());
}

#[test]
fn a_group_list_the_account_writes_cannot_make_root_read_a_file_thousands_of_times() {
    // The group set is the account's after a run: it names one file of its own, just over 1 MiB, 400 times.
    let env = after_a_run_as_nobody(|_| String::new());
    let shared = env.data_dir().join("shared.1");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("big.yml"), format!("# {}\n", "x".repeat(1 << 20))).unwrap();
    std::fs::write(shared.join(".groups.json"), serde_json::to_vec(&vec!["big"; 400]).unwrap()).unwrap();
    let _ = std::fs::remove_file(env.data_dir().join("shared"));
    std::os::unix::fs::symlink("shared.1", env.data_dir().join("shared")).unwrap();
    let mut agent = env.spawn_agent();
    let status = format!("/proc/{}/status", agent.child.id());
    let mut peak = 0u64;
    wait_for(Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let kb = text.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
        peak = peak.max(kb.unwrap_or(0));
        peak > 256 << 10 || env.socket().exists() || agent.child.try_wait().unwrap().is_some()
    });
    agent.signal(libc::SIGKILL);
    assert!(peak <= 256 << 10, "root's agent grew to {peak} KiB reading the group set: {}", agent.log());
    assert!(agent.log().contains("big.yml is over 1048576 bytes; refusing it"), "{}", agent.log());
}

/// `mkfifo at`, as the account (its own directory).
fn fifo_as_nobody(at: &Path) {
    use std::os::unix::process::CommandExt;
    let _ = std::fs::remove_file(at);
    let a = nobody();
    let out = std::process::Command::new("mkfifo").arg(at).uid(a.uid).gid(a.gid).output().unwrap();
    assert!(out.status.success(), "nobody could not mkfifo: {}", text(&out));
}

#[test]
fn a_fifo_at_state_json_does_not_hang_roots_status_check() {
    // `--status` is what the SysV script's start, stop and status run as root.
    let env = after_a_run_as_nobody(|_| String::new());
    fifo_as_nobody(&env.dir.path().join("run/state.json"));
    let mut status = env.cmd().arg("--status").stdout(std::process::Stdio::null()).spawn().unwrap();
    let ended = wait_for(Duration::from_secs(10), || status.try_wait().unwrap().is_some());
    let _ = status.kill();
    let _ = status.wait();
    assert!(ended, "wazuh-agent --status run as root still waits on the FIFO after 10 s");
}

#[test]
fn a_socket_the_account_binds_in_run_dir_cannot_make_roots_send_use_unbounded_memory() {
    use std::io::{Read, Write};
    // The account owns run_dir: it can stop its agent and listen at ingest.sock itself, answering without end.
    let env = after_a_run_as_nobody(|_| String::new());
    let _ = std::fs::remove_file(env.socket());
    let listener = std::os::unix::net::UnixListener::bind(env.socket()).unwrap();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else { return };
        let _ = conn.read(&mut [0; 4096]);
        let chunk = vec![b'x'; 1 << 20];
        while conn.write_all(&chunk).is_ok() {}
    });
    let (mut cmd, null) = (env.cmd(), std::process::Stdio::null);
    let mut send = cmd.arg("--send").stdin(std::process::Stdio::piped()).stdout(null()).stderr(null()).spawn().unwrap();
    drop(send.stdin.take());
    let status = format!("/proc/{}/status", send.id());
    let mut peak = 0u64;
    wait_for(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let kb = text.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
        peak = peak.max(kb.unwrap_or(0));
        peak > 256 << 10 || send.try_wait().unwrap().is_some()
    });
    let _ = send.kill();
    let _ = send.wait();
    assert!(peak <= 256 << 10, "root's --send grew to {peak} KiB reading the reply");
}

#[test]
fn a_fifo_at_the_queue_cursor_does_not_hang_root_at_start() {
    let env = after_a_run_as_nobody(|_| String::new());
    fifo_as_nobody(&env.data_dir().join("queue/cursor"));
    let mut agent = env.spawn_agent();
    let up = wait_for(Duration::from_secs(15), || env.socket().exists() || agent.child.try_wait().unwrap().is_some());
    let stack = std::fs::read_to_string(format!("/proc/{}/wchan", agent.child.id())).unwrap_or_default();
    assert!(up, "root neither started nor stopped in 15 s (blocked in {stack:?}): {}", agent.log());
}

/// Issue 12: under SysV the account could race a link into the run directory (its own) at
/// the respawn pid file root writes at every start, after the old wrapper's `rm` and before its
/// `set -C` write, which refuses only regular files: a link to a FIFO or a device was written
/// through. The respawn loop's files now live in `<run_dir>.init`, which only root can write.
#[test]
fn the_sysv_script_writes_nothing_through_a_link_raced_in_where_the_account_can_write() {
    use std::ffi::CString;
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.write_config("agent.user = \"nobody\"");
    env.registered();
    let (run, a) = (env.dir.path().join("run"), nobody());
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(a.uid), Some(a.gid)).unwrap();
    // Root's FIFO (stands for any FIFO or device node), outside the run directory; the test
    // holds it open read-write, non-blocking, to see what root writes into it.
    let fifo = env.dir.path().join("root-fifo");
    assert!(std::process::Command::new("mkfifo").arg("-m600").arg(&fifo).status().unwrap().success());
    let mut reader =
        std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
    // Where the account plants its link: the old wrapper's pid file in the run directory, and
    // every file of the respawn loop's (in a directory the account cannot enter).
    let init = env.dir.path().join("run.init");
    let at: Vec<PathBuf> = vec![
        run.join("wazuh-agent-respawn.pid"),
        init.join("respawn.pid"),
        init.join("stderr"),
        init.join("output"),
        init.join("exited"),
    ];
    let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let (target, links) = (c(&fifo), at.iter().map(|p| c(p)).collect::<Vec<_>>());
    // The account re-plants its links in a tight loop (a forked child as nobody that makes
    // only system calls until it is killed), so the link is back within microseconds of a `rm`.
    // SAFETY: the child calls only async-signal-safe functions (setgid, setuid, symlink, _exit).
    let racer = unsafe { libc::fork() };
    assert!(racer >= 0, "fork");
    if racer == 0 {
        // SAFETY: as above; every pointer is a CString made before the fork.
        unsafe {
            if libc::setgid(a.gid) != 0 || libc::setuid(a.uid) != 0 {
                libc::_exit(1);
            }
            loop {
                for l in &links {
                    libc::symlink(target.as_ptr(), l.as_ptr());
                }
            }
        }
    }
    let mut written = String::new();
    let mut outputs = Vec::new();
    let mut hung = None;
    {
        let _stop = SysvStop(&env);
        // start-stop-daemon, then a plain shell, then start-stop-daemon again.
        for (i, action) in ["start", "stop"].repeat(3).into_iter().enumerate() {
            let mut cmd = sysv_script(&env, action);
            if i / 2 == 1 {
                cmd.env("WAZUH_AGENT_PLAIN_SHELL", "1");
            }
            let Some(out) = output_within(cmd, Duration::from_secs(60)) else {
                hung = Some(action);
                break;
            };
            let mut buf = [0u8; 256];
            if let Ok(n) = reader.read(&mut buf) {
                written.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            outputs.push(text(&out));
            if !written.is_empty() || !out.status.success() {
                break;
            }
        }
        // SAFETY: kill(2) and waitpid(2) on the child forked above.
        unsafe {
            libc::kill(racer, libc::SIGKILL);
            libc::waitpid(racer, std::ptr::null_mut(), 0);
        }
        // Nothing may read the FIFO through a link while the guard stops the agent.
        let _ = std::fs::remove_file(&at[0]);
    }
    assert!(written.is_empty(), "root wrote {written:?} into its FIFO through the account's link");
    assert_eq!(hung, None, "the script hung (reading a pid through the account's link to the FIFO?): {outputs:#?}");
    assert_eq!(outputs.len(), 6, "three starts and stops, each successful: {outputs:#?}");
}

/// `cmd`'s output, or None if it did not end within `limit` (its process group is then killed).
fn output_within(mut cmd: std::process::Command, limit: Duration) -> Option<std::process::Output> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut child = cmd.process_group(0).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    if wait_for(limit, || child.try_wait().unwrap().is_some()) {
        return Some(child.wait_with_output().unwrap());
    }
    // SAFETY: kill(2) on the process group of the child spawned above.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
    None
}
