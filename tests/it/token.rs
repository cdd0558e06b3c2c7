//! Token lifecycle through the real token thread against the mock comms API.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use wazuh_agent::config::{Config, RetryConfig};
use wazuh_agent::credentials::{Credentials, Secret};
use wazuh_agent::http::{self, Request};
use wazuh_agent::live::Live;
use wazuh_agent::token::{self, Authenticator, TokenCell};

use crate::support::*;

const KEY: &str = "0123456789abcdefghijABCDEFGHIJ01";

/// A token thread running in this process; stopped on drop.
struct TokenThread {
    cell: Arc<TokenCell>,
    shutdown: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for TokenThread {
    fn drop(&mut self) {
        self.shutdown.take();
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

fn start(env: &Env, urls: Vec<String>, uuid: &str) -> TokenThread {
    let mut config = Config::load(Some(&env.config)).unwrap();
    config.server.urls = urls;
    config.retry = RetryConfig { initial: Duration::from_millis(200), max: Duration::from_secs(2) };
    let creds = Credentials { uuid: uuid.into(), key: Secret::new(KEY.into()), name: "t".into() };
    start_with(config, creds).0
}

/// The token thread with `config` as its live settings (returned, to change them).
fn start_with(config: Config, creds: Credentials) -> (TokenThread, Arc<Live>) {
    let agent = http::build_agent(&config.server, Duration::from_secs(5)).unwrap();
    let auth = Authenticator::new(agent, &config.server.urls, creds);
    let live = Live::new(config, String::new());
    let (cell, wake) = TokenCell::new();
    let (shutdown_tx, shutdown_rx) = crossbeam_channel::bounded(0);
    let (c, l) = (cell.clone(), live.clone());
    let handle = std::thread::spawn(move || token::run(c, wake, shutdown_rx, auth, l));
    (TokenThread { cell, shutdown: Some(shutdown_tx), handle: Some(handle) }, live)
}

fn registered_env() -> (Env, String) {
    let env = Env::new();
    let uuid = uuid::Uuid::now_v7().to_string();
    env.mock.add_agent(&uuid, KEY, "t");
    (env, uuid)
}

fn ok_auth_calls(env: &Env) -> Vec<Instant> {
    env.mock.auth_calls().iter().filter(|c| c.status == 200).map(|c| c.at).collect()
}

#[test]
fn renews_before_expiry_with_a_three_second_token() {
    let (env, uuid) = registered_env();
    env.mock.set_token_lifetime(3);
    let t = start(&env, vec![env.mock.comms_url()], &uuid);
    assert!(wait_for(Duration::from_secs(15), || t.cell.current().is_some_and(|tok| tok.generation >= 4)));
    let calls = ok_auth_calls(&env);
    for pair in calls.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap < Duration::from_secs(3), "renewed {gap:?} after the previous token: it had expired");
        assert!(gap >= token::MIN_RENEWAL / 2, "renewed only {gap:?} later: a refresh loop");
    }
    // The token in use is accepted by the server.
    let tok = t.cell.current().unwrap();
    let config = Config::load(Some(&env.config)).unwrap();
    let agent = http::build_agent(&config.server, Duration::from_secs(5)).unwrap();
    let url = format!("{}/api/v1/files?file_name=none.yml", tok.server);
    let reply = http::send(&agent, &url, Some(&tok.bearer()), &Request::Get, None).unwrap();
    assert_eq!(reply.status, 404, "authorized (file simply absent): {}", reply.message());
}

#[test]
fn many_threads_refused_at_once_cause_exactly_one_reauthentication() {
    let (env, uuid) = registered_env();
    let t = start(&env, vec![env.mock.comms_url()], &uuid);
    let first = t.cell.wait_newer(0, Duration::from_secs(10)).expect("first token");
    env.mock.expire_tokens();
    let config = Config::load(Some(&env.config)).unwrap();

    let workers: Vec<_> = (0..8)
        .map(|_| {
            let cell = t.cell.clone();
            let server = config.server.clone();
            std::thread::spawn(move || {
                let agent = http::build_agent(&server, Duration::from_secs(5)).unwrap();
                let mut tok = cell.current().unwrap();
                for _ in 0..3 {
                    let url = format!("{}/api/v1/files?file_name=none.yml", tok.server);
                    let reply = http::send(&agent, &url, Some(&tok.bearer()), &Request::Get, None).unwrap();
                    match http::classify(
                        http::Attempt::Status { code: reply.status, retry_after: None },
                        std::time::SystemTime::now(),
                        Duration::from_secs(1),
                    ) {
                        http::Outcome::Reauth => {
                            cell.refused(tok.generation);
                            tok = cell.wait_newer(tok.generation, Duration::from_secs(10)).expect("new token");
                        }
                        _ => return reply.status,
                    }
                }
                0
            })
        })
        .collect();
    for w in workers {
        assert_eq!(w.join().unwrap(), 404, "request succeeded with the renewed token");
    }
    assert_eq!(ok_auth_calls(&env).len(), 2, "initial authentication + exactly one refresh");
    assert_eq!(t.cell.current().unwrap().generation, first.generation + 1);
}

#[test]
fn clock_skew_does_not_cause_a_refresh_loop() {
    for offset in [-10 * 365 * 86_400i64, 10 * 365 * 86_400] {
        let (env, uuid) = registered_env();
        env.mock.set_clock_offset(offset);
        env.mock.set_token_lifetime(4);
        let t = start(&env, vec![env.mock.comms_url()], &uuid);
        assert!(wait_for(Duration::from_secs(10), || t.cell.current().is_some_and(|tok| tok.generation >= 2)));
        let started = Instant::now();
        let before = ok_auth_calls(&env).len();
        std::thread::sleep(Duration::from_secs(3));
        let renewals = ok_auth_calls(&env).len() - before;
        // A 4 s token is renewed every 2 s by exp - iat; a loop would make hundreds of calls.
        assert!(renewals <= (started.elapsed().as_secs() as usize) + 1, "offset {offset}: {renewals} renewals in 3 s");
    }
}

#[test]
fn dead_credentials_are_retried_slowly_and_nothing_is_deleted() {
    let env = Env::new();
    env.registered();
    let creds = Credentials::load(&env.data_dir()).unwrap();
    env.mock.remove_agent(&creds.uuid);
    let mut config = Config::load(Some(&env.config)).unwrap();
    config.retry = RetryConfig { initial: Duration::from_millis(100), max: Duration::from_millis(800) };
    let (t, _live) = start_with(config, creds.clone());
    let cell = t.cell.clone();
    assert!(wait_for(Duration::from_secs(5), || cell.last_error().is_some()));
    let msg = cell.last_error().unwrap();
    assert!(msg.contains("Agent does not exist") && msg.contains("--register --force"), "{msg}");
    std::thread::sleep(Duration::from_secs(2));
    drop(t);
    // Retries happen at least retry.max / 2 apart.
    let calls = env.mock.auth_calls();
    for pair in calls.windows(2) {
        assert!(pair[1].at - pair[0].at >= Duration::from_millis(390), "{:?}", pair[1].at - pair[0].at);
    }
    assert!(calls.len() >= 2, "it keeps trying");
    assert_eq!(Credentials::load(&env.data_dir()).unwrap(), creds, "credentials kept");
    assert!(!msg.contains(creds.key.expose()));
}

#[test]
fn fails_over_to_the_next_server() {
    let (env, uuid) = registered_env();
    let dead = format!("https://127.0.0.1:{}", dead_port());
    let t = start(&env, vec![dead, env.mock.comms_url()], &uuid);
    let tok = t.cell.wait_newer(0, Duration::from_secs(10)).expect("token from the second server");
    assert_eq!(tok.server, env.mock.comms_url());
}

#[test]
fn retries_after_server_errors_with_backoff() {
    let (env, uuid) = registered_env();
    env.mock.inject(wazuh_mock_server::Fault {
        path: "/api/v1/authentication".into(),
        times: 3,
        action: wazuh_mock_server::FaultAction::Status { code: 503, retry_after: Some("1".into()), body: None },
    });
    let started = Instant::now();
    let t = start(&env, vec![env.mock.comms_url()], &uuid);
    assert!(t.cell.wait_newer(0, Duration::from_secs(15)).is_some());
    // Three 503s with Retry-After: 1 each were honoured before the fourth attempt.
    assert!(started.elapsed() >= Duration::from_secs(3), "{:?}", started.elapsed());
    let statuses: Vec<u16> = env.mock.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 503, 200]);
}

#[test]
fn a_live_retry_change_reaches_the_token_thread() {
    // Dead credentials are retried after retry.max / 2 plus jitter: the gaps show retry.max.
    let env = Env::new();
    env.registered();
    let creds = Credentials::load(&env.data_dir()).unwrap();
    env.mock.remove_agent(&creds.uuid);
    let mut config = Config::load(Some(&env.config)).unwrap();
    config.retry = RetryConfig { initial: Duration::from_millis(50), max: Duration::from_millis(200) };
    let (_t, live) = start_with(config.clone(), creds);
    assert!(wait_for(Duration::from_secs(5), || env.mock.auth_calls().len() >= 2));
    let calls = env.mock.auth_calls();
    assert!(calls[1].at - calls[0].at < Duration::from_millis(1990), "{:?}", calls[1].at - calls[0].at);

    // As a group file would: retry.max becomes 4 s while the thread runs.
    config.retry = RetryConfig { initial: Duration::from_millis(50), max: Duration::from_secs(4) };
    live.apply(config);
    // Every call recorded from now on failed after the change: the next one waits >= 2 s.
    let k = env.mock.auth_calls().len();
    assert!(wait_for(Duration::from_secs(15), || env.mock.auth_calls().len() >= k + 2));
    let calls = env.mock.auth_calls();
    assert!(calls[k + 1].at - calls[k].at >= Duration::from_millis(1990), "{:?}", calls[k + 1].at - calls[k].at);
}

#[test]
fn tokens_with_extreme_claims_do_not_stop_the_token_thread() {
    let (env, uuid) = registered_env();
    let (max, min) = (i64::MAX, i64::MIN);
    let table = [
        serde_json::json!({"iat": 0, "exp": max}),
        serde_json::json!({"iat": min, "exp": max}),
        serde_json::json!({"iat": max, "exp": min}),
        serde_json::json!({"iat": -5, "exp": -1}),
        serde_json::json!({"iat": null, "exp": max}),
    ];
    for claims in table {
        env.mock.set_token_claims(Some(claims.clone()));
        let mut t = start(&env, vec![env.mock.comms_url()], &uuid);
        let got = wait_for(Duration::from_secs(10), || t.cell.current().is_some());
        t.shutdown.take();
        let joined = t.handle.take().unwrap().join();
        assert!(joined.is_ok() && got, "{claims}: the token thread panicked or got no token");
    }
}

#[test]
fn an_agent_given_a_token_that_never_expires_keeps_running_and_delivering() {
    let env = Env::new();
    env.mock.set_token_claims(Some(serde_json::json!({"iat": 0, "exp": i64::MAX})));
    let mut agent = env.running_agent();
    env.send_ok(&lines([stateless(1)]));
    assert!(env.mock.wait_until(Duration::from_secs(10), |m| originals(m).contains(&"msg-1".to_string())));
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent is running: {}", agent.log());
    assert!(agent.log().contains("token lifetime 31622400s"), "{}", agent.log());
}
