//! Run mode of the real binary: authenticate, renew, shut down on signals.

use std::time::Duration;

use crate::support::*;

#[test]
fn runs_authenticates_and_stops_cleanly_on_sigterm() {
    let env = Env::new();
    env.mock.set_token_lifetime(3);
    env.registered();
    let mut agent = env.spawn_agent();
    assert!(
        wait_for(Duration::from_secs(15), || env.mock.auth_calls().iter().filter(|c| c.status == 200).count() >= 3),
        "the agent authenticated and renewed its token: {}",
        agent.log()
    );
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0), "{}", agent.log());
    let log = agent.log();
    assert!(log.contains("authenticated with") && log.contains("token renewed") && log.contains("stopped"), "{log}");
}

#[test]
fn sigint_also_stops_cleanly() {
    let env = Env::new();
    env.registered();
    let mut agent = env.spawn_agent();
    assert!(wait_for(Duration::from_secs(10), || !env.mock.auth_calls().is_empty()));
    agent.signal(libc::SIGINT);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0), "{}", agent.log());
}

#[test]
fn refuses_to_run_unregistered() {
    let env = Env::new();
    let out = env.cmd().output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("not registered") && text(&out).contains("--register"), "{}", text(&out));
}

#[test]
fn no_secret_reaches_the_logs() {
    let env = Env::new();
    env.mock.set_token_lifetime(3);
    let reg = env.register(&[]);
    assert!(reg.status.success());
    let creds: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.data_dir().join("credentials.json")).unwrap()).unwrap();
    let key = creds["key"].as_str().unwrap().to_string();
    env.write_config("log.level = \"trace\"");
    let mut agent = env.spawn_agent();
    assert!(wait_for(Duration::from_secs(15), || env.mock.auth_calls().len() >= 2));
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
    let log = format!("{}{}", agent.log(), text(&reg));
    assert!(log.len() > 200, "trace logging produced output");
    assert!(!log.contains(&key), "the key leaked into the log");
    assert!(!log.contains(PASSWORD), "the password leaked into the log");
    // A JWT always starts with the base64 of '{"' ("eyJ").
    let leaked: Vec<&str> = log.lines().filter(|l| l.contains("eyJ")).collect();
    assert!(leaked.is_empty(), "a token leaked into the log: {leaked:?}");
}
