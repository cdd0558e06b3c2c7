//! Command line and configuration handling of the binary.

use std::process::Command;

use crate::support::*;

#[test]
fn version_and_help() {
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("wazuh-agent "));
    let out = Command::new(bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--register", "--send", "--status", "--check-config", "--password-file", "WAZUH_REGISTRATION_PASSWORD"]
    {
        assert!(help.contains(flag), "help lacks {flag}");
    }
    // --key is visible in `ps`: the help says so and names the other ways.
    assert!(help.contains("--key-file FILE") && help.contains("WAZUH_REGISTRATION_KEY"), "{help}");
    assert!(help.contains("--key KEY") && help.contains("a key on the command line is visible in `ps`"), "{help}");
}

#[test]
fn check_config_prints_effective_values() {
    let env = Env::new();
    env.write_config("events.batch_interval = \"250ms\"");
    let out = env.cmd().arg("--check-config").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("events.batch_interval = \"250ms\""), "{stdout}");
    assert!(stdout.contains(&format!("agent.data_dir = {:?}", env.data_dir().display().to_string())), "{stdout}");
}

#[test]
fn bad_config_names_file_and_key() {
    let env = Env::new();
    env.write_config("server.verify = \"sometimes\"");
    let out = env.cmd().arg("--check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("server.verify") && t.contains("sometimes"), "{t}");

    std::fs::write(&env.config, "[events]\nbogus_key = 1\n").unwrap();
    let out = env.cmd().arg("--check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("events.bogus_key") && t.contains(&env.config.display().to_string()), "{t}");
}

#[test]
fn missing_explicit_config_is_an_error_and_env_variable_is_honoured() {
    let out = Command::new(bin()).args(["--check-config", "--config", "/nonexistent/agent.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("/nonexistent/agent.toml"));

    let env = Env::new();
    env.write_config("agent.name = \"from-env\"");
    let out = Command::new(bin()).arg("--check-config").env("WAZUH_AGENT_CONFIG", &env.config).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("agent.name = \"from-env\""));
}

#[test]
fn usage_errors_name_the_flag() {
    let out = Command::new(bin()).args(["--register", "--url", "https://x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("--user"), "{}", text(&out));
    let out = Command::new(bin()).arg("--frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("--frobnicate"));
}

#[test]
fn shipped_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/etc/wazuh-agent.toml");
    let out = Command::new(bin()).args(["--check-config", "--config", path]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_reader_that_goes_away_is_a_quiet_success() {
    // `wazuh-agent --check-config | head -1`, with `head` gone before the first write: a
    // pipe whose read end is closed before the binary starts.
    let env = Env::new();
    let mut fds = [0; 2];
    // SAFETY: pipe(2) into a two-element array; both ends are owned right after.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the descriptors were just created and are owned by nothing else.
    let (read, write) = unsafe {
        use std::os::fd::FromRawFd;
        (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1]))
    };
    drop(read);
    for args in [&["--check-config"][..], &["--version"], &["--help"], &["--status"]] {
        let out = env.cmd().args(args).stdout(write.try_clone().unwrap()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn send_without_permission_on_the_socket_says_so() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (CI runs as root)");
    }
    let env = Env::new();
    // `nobody` may traverse the temp dir and read the config, but the socket is root's, 0600.
    std::fs::set_permissions(env.dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&env.config, PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::create_dir_all(env.socket().parent().unwrap()).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(env.socket()).unwrap();
    std::fs::set_permissions(env.socket(), PermissionsExt::from_mode(0o600)).unwrap();
    let nobody = wazuh_agent::privileges::resolve("nobody", None).unwrap();
    let out =
        env.cmd().arg("--send").uid(nobody.uid).gid(nobody.gid).stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let want = format!("permission denied on {}: ", env.socket().display());
    assert!(
        text(&out).contains(&want) && text(&out).contains("run as root or a member of the socket's group"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("not running"), "{}", text(&out));
}
