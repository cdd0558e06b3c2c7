//! Operations: the init scripts, install, single instance, log reopen, privilege drop.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_shell_script_passes_shellcheck() {
    let scripts = [
        "scripts/init.d/wazuh-agent",
        "scripts/openrc/wazuh-agent",
        "scripts/procd/wazuh-agent",
        "scripts/deps.sh",
        "scripts/deb/postinst",
        "scripts/deb/prerm",
        "scripts/deb/postrm",
    ];
    let out = Command::new("shellcheck")
        .args(["-s", "sh"])
        .args(scripts.iter().map(|s| repo().join(s)))
        .output()
        .expect("shellcheck is installed (.ci/run installs it from Debian's packages)");
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new("shellcheck").arg(repo().join("scripts/demo.sh")).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// How the SysV script is run: the shell, and whether start-stop-daemon may be used.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Shell {
    /// `sh` (dash on Debian), with start-stop-daemon.
    Debian,
    /// `busybox sh` with nothing but BusyBox's own tools in PATH (`sh`, `tail`, `mktemp`,
    /// `setsid`, …), as on a small host: no start-stop-daemon.
    Busybox,
    /// As `Busybox`, without `setsid` either.
    BusyboxNoSetsid,
}

/// A directory of links to busybox for every tool the SysV script runs (and `setsid` if asked):
/// the only directory in PATH for the `Busybox` shells.
fn busybox_tools(setsid: bool) -> &'static Path {
    static DIRS: [std::sync::OnceLock<PathBuf>; 2] = [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    DIRS[usize::from(setsid)].get_or_init(|| {
        let name = if setsid { "busybox-tools" } else { "busybox-tools-without-setsid" };
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let busybox = Command::new("sh").args(["-c", "command -v busybox"]).output().unwrap();
        assert!(busybox.status.success(), "busybox is installed (scripts/deps.sh)");
        let busybox = String::from_utf8(busybox.stdout).unwrap().trim().to_string();
        let tools = [
            "sh", "cat", "chmod", "cut", "date", "dirname", "basename", "id", "ln", "logger", "ls", "mkdir", "mkfifo",
            "mktemp", "mv", "rm", "sed", "sleep", "tail", "tr", "fold",
        ];
        for tool in tools.iter().chain(if setsid { &["setsid"][..] } else { &[] }) {
            match std::os::unix::fs::symlink(&busybox, dir.join(tool)) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => panic!("{tool}: {e}"),
                _ => {}
            }
        }
        dir
    })
}

/// The SysV script run with `shell`, `WAZUH_AGENT_BIN` and `WAZUH_AGENT_CONFIG` set; no
/// other file of the project is used.
fn sysv_cmd(env: &Env, shell: Shell, action: &str) -> Command {
    let script = repo().join("scripts/init.d/wazuh-agent");
    let mut c = match shell {
        Shell::Debian => Command::new("sh"),
        Shell::Busybox | Shell::BusyboxNoSetsid => {
            let tools = busybox_tools(shell == Shell::Busybox);
            let mut c = Command::new(tools.join("sh"));
            c.env("WAZUH_AGENT_PLAIN_SHELL", "1").env("PATH", tools);
            c
        }
    };
    if action == "start" {
        // Started from a context that ignores HUP (nohup, some init systems): the respawn loop
        // inherits it, cannot trap it, and `reload` must still reach the agent.
        // SAFETY: signal(2) between fork and exec, async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                Ok(())
            })
        };
    }
    c.arg(script)
        .arg(action)
        .env("WAZUH_AGENT_BIN", bin())
        .env("WAZUH_AGENT_CONFIG", &env.config)
        .env("WAZUH_AGENT_DEFAULTS", env.dir.path().join("no-defaults"));
    c
}

fn sysv(env: &Env, shell: Shell, action: &str) -> Output {
    sysv_cmd(env, shell, action).output().unwrap()
}

fn agent_pid(env: &Env) -> Option<u32> {
    std::fs::read_to_string(env.dir.path().join("run/wazuh-agent.pid")).ok()?.trim().parse().ok()
}

/// The respawn loop's pid file, in the root-only directory next to run_dir.
fn loop_pid_file(env: &Env) -> PathBuf {
    env.dir.path().join("run.init/respawn.pid")
}

fn loop_pid(env: &Env) -> Option<u32> {
    std::fs::read_to_string(loop_pid_file(env)).ok()?.trim().parse().ok()
}

fn alive(pid: u32) -> bool {
    // A zombie has no cmdline: it is gone as far as these tests care.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// Stops whatever a test started through the script, even when it fails half-way.
struct Stopper<'a>(&'a Env, Shell);

impl Drop for Stopper<'_> {
    fn drop(&mut self) {
        if loop_pid(self.0).is_some() || agent_pid(self.0).is_some_and(alive) {
            let _ = sysv(self.0, self.1, "stop");
        }
    }
}

fn sysv_lifecycle(shell: Shell) {
    let env = Env::new();
    env.write_config(&format!("log.file = {:?}", env.dir.path().join("agent.log").display().to_string()));
    env.registered();
    let out = sysv(&env, shell, "status");
    assert_eq!(out.status.code(), Some(3), "not running yet: {}", text(&out));
    let _stop = Stopper(&env, shell);
    let out = sysv(&env, shell, "start");
    assert_eq!(out.status.code(), Some(0), "start: {}", text(&out));
    assert_eq!(sysv(&env, shell, "status").status.code(), Some(0));
    let first = agent_pid(&env).expect("pid file");
    let respawn = loop_pid(&env).expect("the respawn loop's pid file");
    assert!(alive(respawn));

    // A second start is fine and starts nothing.
    let out = sysv(&env, shell, "start");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("already running"));
    assert_eq!(agent_pid(&env), Some(first));

    // A crash is noticed and the agent comes back.
    // SAFETY: kill(2) on the agent this test started.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(20), || agent_pid(&env).is_some_and(|p| p != first)
            && sysv(&env, shell, "status").status.success()),
        "respawned after a crash"
    );
    assert_eq!(loop_pid(&env), Some(respawn), "the same loop");

    let out = sysv(&env, shell, "reload");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let log = env.dir.path().join("agent.log");
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(&log).unwrap_or_default().contains("SIGHUP")),
        "reload reached the agent: {}\nagent log:\n{}",
        text(&out),
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // A restart with a broken configuration stops nothing.
    let good = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{good}\n[nonsense]\n")).unwrap();
    let running = agent_pid(&env).unwrap();
    let out = sysv(&env, shell, "restart");
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(text(&out).contains("nonsense"), "the agent's own message: {}", text(&out));
    assert!(alive(running) && agent_pid(&env) == Some(running), "still running");
    // A stop with a broken configuration stops all the same: the loop is found by process.
    let out = sysv(&env, shell, "stop");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("nonsense") && !alive(running) && !alive(respawn), "stopped: {}", text(&out));
    std::fs::write(&env.config, good).unwrap();
    let out = sysv(&env, shell, "start");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (running, respawn) = (agent_pid(&env).unwrap(), loop_pid(&env).expect("a new respawn loop"));
    let out = sysv(&env, shell, "restart");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!alive(running) && !alive(respawn), "the old agent and loop ended");
    assert!(agent_pid(&env).is_some_and(|p| p != running) && sysv(&env, shell, "status").status.success());
    let respawn = loop_pid(&env).expect("a new respawn loop");

    let out = sysv(&env, shell, "stop");
    assert_eq!(out.status.code(), Some(0), "stop: {}", text(&out));
    assert_eq!(sysv(&env, shell, "status").status.code(), Some(3));
    assert!(!loop_pid_file(&env).exists() && !alive(respawn), "the respawn loop is gone too");
    // Stopping a stopped agent is not an error (LSB).
    assert_eq!(sysv(&env, shell, "stop").status.code(), Some(0));
}

/// What the agent writes to standard error reaches root's terminal when it exits at start: the agent running as
/// agent.user is that account's process, so the line may be endless (bounded by `fold`) and hold control characters
/// (escaped), in both shells.
#[test]
fn sysv_start_prints_the_last_lines_bounded_and_escaped() {
    let env = Env::new();
    env.registered();
    let fake = env.dir.path().join("fake-agent");
    let script = format!(
        "#!/bin/sh\ncase \"$3\" in --check-config|--status) exec {:?} \"$@\" ;; esac\n\
         /usr/bin/head -c 8000000 /dev/zero | /usr/bin/tr '\\0' A >&2\nprintf '\\n\\033]0;pwned\\007 evil\\n' >&2\nexit 1\n",
        bin()
    );
    std::fs::write(&fake, script).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for shell in [Shell::Debian, Shell::Busybox] {
        let _stop = Stopper(&env, shell);
        let out = sysv_cmd(&env, shell, "start").env("WAZUH_AGENT_BIN", &fake).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("the agent exited at start with status 1"), "{said}");
        assert!(said.contains("?]0;pwned? evil") && !said.contains('\x1b') && !said.contains('\x07'), "{said}");
        assert!(said.len() < 32 << 10, "{shell:?}: {} bytes: one endless line is cut at 1024 bytes a line", said.len());
    }
}

#[test]
fn sysv_script_with_start_stop_daemon() {
    let found =
        Command::new("sh").args(["-c", "command -v start-stop-daemon"]).output().is_ok_and(|o| o.status.success());
    assert!(found, "start-stop-daemon is part of Debian's dpkg and must be present");
    sysv_lifecycle(Shell::Debian);
}

#[test]
fn sysv_script_with_a_plain_busybox_shell() {
    sysv_lifecycle(Shell::Busybox);
}

#[test]
fn sysv_script_with_a_plain_busybox_shell_without_setsid() {
    sysv_lifecycle(Shell::BusyboxNoSetsid);
}

/// Issue 13: only the binary, the config and the script, side by side in one directory, run
/// as `WAZUH_AGENT_BIN=… WAZUH_AGENT_CONFIG=… sh wazuh-agent ACTION` from there.
#[test]
fn the_sysv_script_alone_next_to_a_binary_and_a_config_starts_stops_and_respawns_the_agent() {
    let env = Env::new();
    env.registered();
    let alone = tempfile::tempdir().unwrap();
    let d = alone.path();
    std::fs::copy(repo().join("scripts/init.d/wazuh-agent"), d.join("wazuh-agent")).unwrap();
    std::fs::create_dir(d.join("bin")).unwrap();
    std::fs::copy(bin(), d.join("bin/wazuh-agent")).unwrap();
    std::fs::copy(&env.config, d.join("wazuh-agent.toml")).unwrap();
    assert_eq!(std::fs::read_dir(d).unwrap().count(), 3);
    let run = |action: &str| {
        Command::new("sh")
            .args(["wazuh-agent", action])
            .current_dir(d)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WAZUH_AGENT_BIN", "bin/wazuh-agent")
            .env("WAZUH_AGENT_CONFIG", "wazuh-agent.toml")
            .output()
            .unwrap()
    };
    struct Stop<'a>(&'a dyn Fn(&str) -> Output);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = (self.0)("stop");
        }
    }
    let _stop = Stop(&run);
    let out = run("status");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let out = run("start");
    assert_eq!(out.status.code(), Some(0), "start: {}", text(&out));
    assert!(text(&out).contains("wazuh-agent started"), "{}", text(&out));
    assert_eq!(run("status").status.code(), Some(0));
    let first = agent_pid(&env).expect("pid file");
    let cmdline = std::fs::read(format!("/proc/{first}/cmdline")).unwrap();
    assert!(cmdline.starts_with(d.join("bin/wazuh-agent").as_os_str().as_encoded_bytes()), "{cmdline:?}");

    // SAFETY: kill(2) on the agent this test started.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(20), || agent_pid(&env).is_some_and(|p| p != first && alive(p))
            && run("status").status.success()),
        "respawned after kill -9"
    );
    let respawn = loop_pid(&env).expect("the respawn loop's pid file");
    let out = run("stop");
    assert_eq!(out.status.code(), Some(0), "stop: {}", text(&out));
    assert!(text(&out).contains("wazuh-agent stopped"));
    assert_eq!(run("status").status.code(), Some(3));
    assert!(!alive(respawn) && !loop_pid_file(&env).exists(), "the respawn loop ended");
    assert_eq!(run("stop").status.code(), Some(0), "stopping a stopped agent");
}

#[test]
fn the_sysv_script_names_a_missing_or_unusable_binary() {
    let env = Env::new();
    let missing = env.dir.path().join("no/such/wazuh-agent");
    for action in ["start", "stop"] {
        let out = sysv_cmd(&env, Shell::Debian, action).env("WAZUH_AGENT_BIN", &missing).output().unwrap();
        assert_eq!(out.status.code(), Some(5), "LSB: not installed: {}", text(&out));
        let says = format!("the agent binary {} does not exist", missing.display());
        assert!(text(&out).contains(&says), "{action}: {}", text(&out));
    }
    let plain = env.dir.path().join("wazuh-agent");
    std::fs::write(&plain, "not a program").unwrap();
    let out = sysv_cmd(&env, Shell::Busybox, "start").env("WAZUH_AGENT_BIN", &plain).output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("is not an executable file"), "{}", text(&out));
    let out = sysv_cmd(&env, Shell::Debian, "status").env("WAZUH_AGENT_BIN", &missing).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "LSB status: unknown: {}", text(&out));
}

#[test]
fn the_sysv_script_prints_the_agents_own_message_for_an_invalid_config() {
    let env = Env::new();
    std::fs::write(&env.config, "[agent]\nrun_dir = 5\n").unwrap();
    let own = env.cmd().arg("--check-config").output().unwrap();
    assert_eq!(own.status.code(), Some(1));
    let own = String::from_utf8(own.stderr).unwrap();
    assert!(own.contains("agent.run_dir"), "{own}");
    for shell in [Shell::Debian, Shell::Busybox] {
        let out = sysv(&env, shell, "start");
        assert_eq!(out.status.code(), Some(6), "LSB: not configured: {}", text(&out));
        let t = text(&out);
        assert!(t.contains(&format!("invalid configuration {}", env.config.display())), "{t}");
        assert!(t.contains(own.trim()), "the agent's own message {own:?} in {t}");
    }
    assert!(!env.dir.path().join("run.init").exists(), "nothing was started");
}

#[test]
fn the_sysv_script_prints_the_agents_last_lines_when_it_exits_at_start() {
    // Not registered: the agent exits 1 at start, saying so on standard error.
    let env = Env::new();
    let mut direct = env.spawn_agent();
    assert_eq!(direct.wait_exit(Duration::from_secs(15)), Some(1));
    let own = direct.log();
    assert!(own.contains("not registered"), "{own}");
    for shell in [Shell::Debian, Shell::Busybox] {
        let _stop = Stopper(&env, shell);
        let out = sysv(&env, shell, "start");
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let t = text(&out);
        assert!(t.contains("the agent exited at start with status 1"), "{t}");
        assert!(t.contains(own.lines().last().unwrap().trim()), "the agent's own message {own:?} in {t}");
        // A failed start leaves nothing behind to retry in the background.
        assert!(!loop_pid_file(&env).exists(), "{t}");
        assert_eq!(sysv(&env, shell, "status").status.code(), Some(3));
    }
}

#[test]
fn the_sysv_script_says_when_it_needs_root() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (CI runs as root)");
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.write_config("agent.user = \"nobody\"");
    let nobody = wazuh_agent::privileges::resolve("nobody", None).unwrap();
    let out = sysv_cmd(&env, Shell::Debian, "start").uid(nobody.uid).gid(nobody.gid).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "LSB: insufficient privilege: {}", text(&out));
    assert!(text(&out).contains("needs root; run this script as root"), "{}", text(&out));
    // Without agent.user, the script still cannot make its directory next to a root-owned run_dir.
    env.write_config("");
    std::fs::set_permissions(env.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = sysv_cmd(&env, Shell::Busybox, "start").uid(nobody.uid).gid(nobody.gid).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("permission denied; run this script as root"), "{}", text(&out));
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

#[test]
fn make_install_into_destdir_for_every_init_system() {
    for init in ["sysv", "openrc", "systemd", "procd"] {
        let dest = tempfile::tempdir().unwrap();
        let out = Command::new("make")
            .current_dir(repo())
            .args(["--no-print-directory", "install-files", "PREFIX=/usr"])
            .arg(format!("DESTDIR={}", dest.path().display()))
            .arg(format!("INIT={init}"))
            .arg(format!("BIN={}", bin()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{init}: {}", text(&out));
        let d = dest.path();
        assert_eq!(mode(&d.join("usr/bin/wazuh-agent")), 0o755);
        assert_eq!(mode(&d.join("etc/wazuh-agent/wazuh-agent.toml")), 0o644);
        assert_eq!(mode(&d.join("var/lib/wazuh-agent")), 0o700);
        let service = match init {
            "systemd" => d.join("lib/systemd/system/wazuh-agent.service"),
            _ => d.join("etc/init.d/wazuh-agent"),
        };
        let text_of = std::fs::read_to_string(&service).unwrap();
        assert!(
            text_of.contains("/usr/bin/wazuh-agent") && !text_of.contains("/usr/local/bin"),
            "{init}: paths rewritten"
        );
        if init == "sysv" {
            assert!(!d.join("usr/libexec").exists(), "the SysV script needs no other file");
        }
        // An existing configuration is never overwritten.
        std::fs::write(d.join("etc/wazuh-agent/wazuh-agent.toml"), "# mine\n").unwrap();
        let again = Command::new("make")
            .current_dir(repo())
            .args(["--no-print-directory", "install-files", "PREFIX=/usr"])
            .arg(format!("DESTDIR={}", d.display()))
            .arg(format!("BIN={}", bin()))
            .output()
            .unwrap();
        assert!(again.status.success());
        assert_eq!(std::fs::read_to_string(d.join("etc/wazuh-agent/wazuh-agent.toml")).unwrap(), "# mine\n");
        let out = Command::new("make")
            .current_dir(repo())
            .args(["--no-print-directory", "uninstall", "PREFIX=/usr"])
            .arg(format!("DESTDIR={}", d.display()))
            .arg(format!("INIT={init}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(!d.join("usr/bin/wazuh-agent").exists() && !service.exists());
        assert!(d.join("etc/wazuh-agent/wazuh-agent.toml").exists(), "configuration kept");
    }
}

#[test]
fn a_second_agent_is_refused_by_the_pid_lock() {
    let env = Env::new();
    let agent = env.running_agent();
    let out = env.cmd().output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("already running") && t.contains(&agent.child.id().to_string()), "{t}");
}

#[test]
fn sighup_reopens_the_log_file() {
    let env = Env::new();
    let log = env.dir.path().join("agent.log");
    env.write_config(&format!("log.file = {:?}", log.display().to_string()));
    let agent = env.running_agent();
    assert!(wait_for(Duration::from_secs(10), || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("authenticated")));
    let rotated = env.dir.path().join("agent.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    agent.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(10), || std::fs::read_to_string(&log).unwrap_or_default().contains("SIGHUP")));
    assert!(!std::fs::read_to_string(&rotated).unwrap().contains("SIGHUP"), "new lines go to the new file");
}

#[test]
fn drops_privileges_to_agent_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (CI runs as root)");
    }
    let env = Env::new();
    // The agent's own paths sit under the test's temp dir: let the user traverse it.
    std::fs::set_permissions(env.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.write_config("agent.user = \"nobody\"");
    let agent = env.running_agent();
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
    let nobody = wazuh_agent::privileges::resolve("nobody", None).unwrap();
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == nobody.uid.to_string()), "{uid_line}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(env.data_dir().join("credentials.json")).unwrap().uid(), nobody.uid);
    // It still works: events flow and state.json is written by the user.
    env.send_ok(&lines([stateless(1)]));
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| !m.stateless_events().is_empty()));
}

#[test]
fn the_sysv_script_keeps_no_pid_where_another_account_could_replace_it() {
    let env = Env::new();
    env.registered();
    // run_dir in a directory any account may write (not sticky): its `.init` sibling could be
    // swapped for another account's directory, so the script refuses before running anything.
    let open = env.dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    env.write_config(&format!("agent.run_dir = {:?}", open.join("run").display().to_string()));
    for shell in [Shell::Debian, Shell::Busybox] {
        let out = sysv(&env, shell, "start");
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let says =
            format!("{} (or a directory above it) can be replaced by an account other than root", open.display());
        assert!(text(&out).contains(&says), "{}", text(&out));
        assert!(!open.join("run.init").exists() && !open.join("run").exists(), "nothing created or started");
    }
}

/// A stub command for the maintainer scripts: records its arguments in `<dir>/calls`;
/// useradd/userdel also edit `<root>/etc/passwd` (given with `--root`).
fn stub(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let calls = dir.join("calls");
    std::fs::write(&path, format!("#!/bin/sh\necho \"{name} $*\" >> '{}'\n{body}\n", calls.display())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn make_deb_installs_upgrades_and_purges_in_a_throwaway_root() {
    for tool in ["dpkg", "dpkg-deb", "objdump"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().map_or(true, |o| !o.status.success())
        {
            eprintln!("skipped: {tool} is missing (Debian hosts have it)");
            return;
        }
    }
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new("make")
        .current_dir(repo())
        .args(["--no-print-directory", "deb"])
        .arg(format!("DEB_BIN={}", bin()))
        .arg(format!("DEB_OUT={}", out_dir.path().display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "make deb: {}", text(&out));
    let deb = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let field = |f: &str| {
        let o = Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f).output().unwrap();
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let version = std::fs::read_to_string(repo().join("Cargo.toml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("version = \"").map(|v| v.trim_end_matches('"').to_string()))
        .unwrap();
    assert_eq!(field("Package"), "wazuh-agent");
    assert_eq!(field("Version"), version);
    let arch = Command::new("dpkg").arg("--print-architecture").output().unwrap();
    assert_eq!(field("Architecture"), String::from_utf8(arch.stdout).unwrap().trim());
    assert!(field("Depends").starts_with("libc6"), "{}", field("Depends"));
    let conffiles = Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles").output().unwrap();
    let conffiles = String::from_utf8(conffiles.stdout).unwrap();
    assert!(conffiles.lines().any(|l| l == "/etc/wazuh-agent/wazuh-agent.toml"), "{conffiles}");

    // dpkg --root without a container: the maintainer scripts run outside the root with
    // DPKG_ROOT set; the tools they call are stubs that record their calls.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["var/lib/dpkg/updates", "var/lib/dpkg/info", "etc"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::write(r.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let stubs = tempfile::tempdir().unwrap();
    let s = stubs.path();
    stub(s, "useradd", r#"echo "wazuh-agent:x:999:999::/var/lib/wazuh-agent:/usr/sbin/nologin" >> "$2/etc/passwd""#);
    stub(s, "userdel", r#"sed -i '/^wazuh-agent:/d' "$2/etc/passwd""#);
    for name in ["deb-systemd-helper", "update-rc.d", "invoke-rc.d", "systemctl"] {
        stub(s, name, "");
    }
    let dpkg = |args: &[&str]| {
        let out = Command::new("dpkg")
            .arg(format!("--root={}", r.display()))
            .args(["--force-not-root", "--force-script-chrootless", "--force-depends", "--force-confold"])
            .args(args)
            .env("PATH", format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", s.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "dpkg {args:?}: {}", text(&out));
    };
    let calls = || std::fs::read_to_string(s.join("calls")).unwrap_or_default();
    dpkg(&["-i", deb.to_str().unwrap()]);
    assert_eq!(mode(&r.join("usr/bin/wazuh-agent")), 0o755);
    assert_eq!(mode(&r.join("etc/wazuh-agent/wazuh-agent.toml")), 0o644);
    assert_eq!(mode(&r.join("var/lib/wazuh-agent")), 0o700);
    assert_eq!(mode(&r.join("etc/init.d/wazuh-agent")), 0o755);
    assert_eq!(mode(&r.join("lib/systemd/system/wazuh-agent.service")), 0o644);
    let unit = std::fs::read_to_string(r.join("lib/systemd/system/wazuh-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/wazuh-agent") && !unit.contains("/usr/local"), "{unit}");
    let config = std::fs::read_to_string(r.join("etc/wazuh-agent/wazuh-agent.toml")).unwrap();
    assert!(config.lines().any(|l| l == "user = \"wazuh-agent\""), "agent.user set");
    let check = Command::new(bin())
        .args(["--check-config", "--config"])
        .arg(r.join("etc/wazuh-agent/wazuh-agent.toml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "the packaged config is valid: {}", text(&check));
    assert!(std::fs::read_to_string(r.join("etc/passwd")).unwrap().contains("wazuh-agent:"), "user created");
    let c = calls();
    assert!(c.contains("useradd --root") && c.contains("--system"), "{c}");
    assert!(c.contains("deb-systemd-helper enable wazuh-agent.service"), "{c}");
    assert!(c.contains("update-rc.d wazuh-agent defaults"), "{c}");
    assert!(!c.contains("invoke-rc.d") && !c.contains("systemctl"), "nothing started: {c}");

    // An upgrade (the same package again) keeps a changed conffile and the data dir, and
    // does not create the user twice.
    std::fs::write(r.join("etc/wazuh-agent/wazuh-agent.toml"), format!("{config}# mine\n")).unwrap();
    std::fs::write(r.join("var/lib/wazuh-agent/credentials.json"), "{}").unwrap();
    dpkg(&["-i", deb.to_str().unwrap()]);
    assert!(std::fs::read_to_string(r.join("etc/wazuh-agent/wazuh-agent.toml")).unwrap().ends_with("# mine\n"));
    assert!(r.join("var/lib/wazuh-agent/credentials.json").exists());
    assert_eq!(calls().matches("useradd").count(), 1, "{}", calls());

    // Purge: only what existed before (the dpkg database, /etc/passwd without the user).
    std::fs::create_dir_all(r.join("run/wazuh-agent")).unwrap();
    dpkg(&["--purge", "wazuh-agent"]);
    let mut left: Vec<String> = walk(r)
        .into_iter()
        .map(|p| p.strip_prefix(r).unwrap().display().to_string())
        .filter(|p| !p.starts_with("var/lib/dpkg"))
        .collect();
    left.sort();
    assert_eq!(left, ["etc", "etc/passwd", "run", "var", "var/lib"], "{}", calls());
    assert_eq!(std::fs::read_to_string(r.join("etc/passwd")).unwrap(), "root:x:0:0:root:/root:/bin/sh\n");
    let c = calls();
    assert!(c.contains("userdel --root") && c.contains("update-rc.d wazuh-agent remove"), "{c}");
    assert!(c.contains("deb-systemd-helper purge wazuh-agent.service"), "{c}");
}

/// Runs `scripts/deb/<script> <args>` as on a real install (DPKG_ROOT empty), as root in a
/// private mount namespace (it dies with the script, so nothing is left mounted on the
/// host): tmpfs over /var/lib and /run, the stub dir bound over /etc/init.d (so
/// /etc/init.d/wazuh-agent is the `wazuh-agent` stub) and PATH the stubs alone. `setup`
/// runs in the namespace first; every stub succeeds but the calls that `$FAIL` (a pattern
/// it may set) matches, which exit 3. None (skipped) without root, unshare, mount or
/// /etc/init.d. The calls and stderr.
fn real_install(script: &str, args: &[&str], setup: &str) -> Option<(String, String)> {
    let stubs = tempfile::tempdir().unwrap();
    let s = stubs.path();
    let tools = ["getent", "useradd", "userdel", "mkdir", "chmod", "rm", "deb-systemd-helper", "update-rc.d"];
    for name in tools.into_iter().chain(["systemctl", "invoke-rc.d", "wazuh-agent"]) {
        stub(s, name, &format!(r#"case "{name} $*" in $FAIL) exit 3 ;; esac"#));
    }
    let sh = format!(
        "set -e; mount --make-rprivate /; mount -t tmpfs tmpfs /var/lib; mount -t tmpfs tmpfs /run
        mount --bind \"$S\" /etc/init.d; echo ready\n{setup}\nexport PATH=\"$S\"; exec /bin/sh \"$@\""
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &sh, "sh"])
        .arg(repo().join("scripts/deb").join(script))
        .args(args)
        .env("S", s)
        .env("DPKG_ROOT", "")
        .output();
    match out {
        Ok(out) if out.stdout.starts_with(b"ready\n") => {
            assert!(out.status.success(), "{script} {args:?}: {}", text(&out));
            let calls = std::fs::read_to_string(s.join("calls")).unwrap_or_default();
            Some((calls, String::from_utf8(out.stderr).unwrap()))
        }
        out => {
            let why = out.map_or_else(|e| format!("unshare: {e}"), |o| text(&o));
            eprintln!("skipped: no private mount namespace (root, unshare and mount, /etc/init.d): {why}");
            None
        }
    }
}

#[test]
fn the_maintainer_scripts_start_restart_and_stop_the_agent_on_a_real_install() {
    let setup = |word| match word {
        "registered" => "mkdir /var/lib/wazuh-agent; : > /var/lib/wazuh-agent/credentials.json",
        "systemd" => "mkdir -p /run/systemd/system",
        "stopped" => "export FAIL='* status'",
        "no-user" => "export FAIL='getent *'",
        "disabled" => "export FAIL='*was-enabled*'",
        "no-invoke-rc.d" => "rm \"$S/invoke-rc.d\"",
        "no-deb-systemd-helper" => "rm \"$S/deb-systemd-helper\"",
        _ => unreachable!("{word}"),
    };
    let useradd = "useradd --system --user-group --no-create-home --home-dir /var/lib/wazuh-agent \
        --shell /usr/sbin/nologin --comment Wazuh agent wazuh-agent\n";
    let purge = "deb-systemd-helper purge wazuh-agent.service\ndeb-systemd-helper unmask wazuh-agent.service\n\
        update-rc.d wazuh-agent remove\nrm -rf /var/lib/wazuh-agent /run/wazuh-agent /run/wazuh-agent.init\n\
        getent passwd wazuh-agent\nuserdel wazuh-agent\n";
    let says = "wazuh-agent: not registered yet; run 'wazuh-agent --register --url ... --user ... \
        --password-file ...', then start the service\n";
    // The script and its arguments ('' is dpkg's empty $2 on a fresh install), the setup,
    // the calls (for postinst: after the user and the enabling).
    let cases = [
        ("postinst configure ''", "", ""),
        ("postinst configure 0.0.9", "", ""),
        ("postinst configure ''", "no-user", ""),
        ("postinst configure 0.0.9", "disabled", ""),
        ("postinst configure ''", "no-deb-systemd-helper", ""),
        ("postinst configure 0.0.9", "no-deb-systemd-helper", ""),
        (
            "postinst configure ''",
            "registered systemd",
            "systemctl --system daemon-reload\ninvoke-rc.d wazuh-agent start\n",
        ),
        ("postinst configure ''", "registered no-invoke-rc.d", "wazuh-agent start\n"),
        ("postinst configure 0.0.9", "registered", "invoke-rc.d wazuh-agent status\ninvoke-rc.d wazuh-agent restart\n"),
        ("postinst configure 0.0.9", "registered stopped", "invoke-rc.d wazuh-agent status\n"),
        ("postinst configure 0.0.9", "registered no-invoke-rc.d", "wazuh-agent status\nwazuh-agent restart\n"),
        ("prerm remove", "", "invoke-rc.d wazuh-agent stop\n"),
        ("prerm remove", "no-invoke-rc.d", "wazuh-agent stop\n"),
        ("prerm upgrade 0.2.0", "", ""),
        ("postrm remove", "systemd", "systemctl --system daemon-reload\ndeb-systemd-helper mask wazuh-agent.service\n"),
        ("postrm purge", "", purge),
    ];
    for (command, words, calls) in cases {
        let args: Vec<&str> = command.split(' ').map(|a| a.trim_matches('\'')).collect();
        let shell: Vec<&str> = words.split_whitespace().map(setup).collect();
        let Some((c, e)) = real_install(args[0], &args[1..], &shell.join("\n")) else { return };
        let postinst = args[0] == "postinst";
        let pre = if postinst {
            let user = if words.contains("no-user") { useradd } else { "" };
            let then = if words.contains("disabled") { "update-state" } else { "enable" };
            let unit = match words.contains("no-deb-systemd-helper") {
                false => format!(
                    "deb-systemd-helper unmask wazuh-agent.service\n\
                    deb-systemd-helper --quiet was-enabled wazuh-agent.service\ndeb-systemd-helper {then} wazuh-agent.service\n"
                ),
                true if args[2].is_empty() => "systemctl enable wazuh-agent.service\n".into(),
                true => String::new(),
            };
            format!(
                "getent passwd wazuh-agent\n{user}mkdir -p /var/lib/wazuh-agent\nchmod 0700 /var/lib/wazuh-agent\n\
                {unit}update-rc.d wazuh-agent defaults\n"
            )
        } else {
            String::new()
        };
        assert_eq!(c, pre + calls, "{command} ({words})");
        let registered = !postinst || words.contains("registered");
        assert_eq!(e, if registered { "" } else { says }, "{command} ({words})");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        all.push(path.clone());
        if path.is_dir() && !path.is_symlink() {
            all.extend(walk(&path));
        }
    }
    all
}
