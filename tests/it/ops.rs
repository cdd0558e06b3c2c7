//! Operations: the init scripts, install, single instance, log reopen, privilege drop.

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
        "scripts/wazuh-agent-respawn",
        "scripts/init.d/wazuh-agent",
        "scripts/openrc/wazuh-agent",
        "scripts/procd/wazuh-agent",
        "scripts/deps.sh",
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

/// Runs the SysV script with `shell` (e.g. `sh` or `busybox sh`).
fn sysv(env: &Env, shell: &[&str], action: &str, plain: bool) -> Output {
    let mut c = Command::new(shell[0]);
    c.args(&shell[1..])
        .arg(repo().join("scripts/init.d/wazuh-agent"))
        .arg(action)
        .env("WAZUH_AGENT_BIN", bin())
        .env("WAZUH_AGENT_CONFIG", &env.config)
        .env("WAZUH_AGENT_RESPAWN", repo().join("scripts/wazuh-agent-respawn"))
        .env("WAZUH_AGENT_DEFAULTS", env.dir.path().join("no-defaults"));
    if plain {
        c.env("WAZUH_AGENT_PLAIN_SHELL", "1");
    }
    c.output().unwrap()
}

fn agent_pid(env: &Env) -> Option<u32> {
    std::fs::read_to_string(env.dir.path().join("run/wazuh-agent.pid")).ok()?.trim().parse().ok()
}

fn sysv_lifecycle(shell: &[&str], plain: bool) {
    let env = Env::new();
    env.write_config(&format!("log.file = {:?}", env.dir.path().join("agent.log").display().to_string()));
    env.registered();
    let out = sysv(&env, shell, "status", plain);
    assert_eq!(out.status.code(), Some(3), "not running yet: {}", text(&out));
    let out = sysv(&env, shell, "start", plain);
    assert_eq!(out.status.code(), Some(0), "start: {}", text(&out));
    assert_eq!(sysv(&env, shell, "status", plain).status.code(), Some(0));
    let first = agent_pid(&env).expect("pid file");

    // A second start is fine and starts nothing.
    let out = sysv(&env, shell, "start", plain);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("already running"));
    assert_eq!(agent_pid(&env), Some(first));

    // A crash is noticed and the agent comes back.
    // SAFETY: kill(2) on the agent this test started.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(20), || agent_pid(&env).is_some_and(|p| p != first)
            && sysv(&env, shell, "status", plain).status.success()),
        "respawned after a crash"
    );

    let out = sysv(&env, shell, "reload", plain);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = sysv(&env, shell, "stop", plain);
    assert_eq!(out.status.code(), Some(0), "stop: {}", text(&out));
    assert_eq!(sysv(&env, shell, "status", plain).status.code(), Some(3));
    assert!(!env.dir.path().join("run/wazuh-agent-respawn.pid").exists(), "the wrapper is gone too");
    // Stopping a stopped agent is not an error (LSB).
    assert_eq!(sysv(&env, shell, "stop", plain).status.code(), Some(0));
}

#[test]
fn sysv_script_with_start_stop_daemon() {
    let found =
        Command::new("sh").args(["-c", "command -v start-stop-daemon"]).output().is_ok_and(|o| o.status.success());
    assert!(found, "start-stop-daemon is part of Debian's dpkg and must be present");
    sysv_lifecycle(&["sh"], false);
}

#[test]
fn sysv_script_with_a_plain_busybox_shell() {
    sysv_lifecycle(&["busybox", "sh"], true);
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
            assert_eq!(mode(&d.join("usr/libexec/wazuh-agent/wazuh-agent-respawn")), 0o755);
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
