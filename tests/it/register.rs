//! `wazuh-agent --register` against the mock management API.

use serde_json::Value;
use wazuh_mock_server::{Fault, FaultAction};

use crate::support::*;

fn credentials(env: &Env) -> Value {
    let text = std::fs::read_to_string(env.data_dir().join("credentials.json")).expect("credentials.json");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn registers_and_stores_credentials_privately() {
    let env = Env::new();
    std::fs::create_dir_all(env.data_dir()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.data_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = env.register(&["--name", "web-01"]);
    assert!(out.status.success(), "{}", text(&out));
    let uuid = String::from_utf8(out.stdout.clone()).unwrap().trim().to_string();
    assert_eq!(uuid::Uuid::parse_str(&uuid).unwrap().get_version_num(), 7);

    let creds = credentials(&env);
    assert_eq!(creds["uuid"], uuid);
    assert_eq!(creds["name"], "web-01");
    let key = creds["key"].as_str().unwrap().to_string();
    assert_eq!(key.len(), 32);
    assert_eq!(mode(&env.data_dir().join("credentials.json")), 0o600);
    assert_eq!(mode(&env.data_dir()), 0o700, "an existing data_dir is tightened");

    let agents = env.mock.agents();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].id, uuid);
    assert_eq!(agents[0].key, key);
    let host = &agents[0].registration["host"];
    assert!(host["os"]["name"].is_string() && host["architecture"].is_string() && host["ip"].is_array(), "{host}");
    assert_eq!(agents[0].registration["type"], "Endpoint");

    // Standard output is the UUID alone; standard error tells the person what happened and what next.
    assert_eq!(String::from_utf8(out.stdout.clone()).unwrap(), format!("{uuid}\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("] ")).collect();
    let next = if std::path::Path::new("/run/systemd/system").exists() {
        "systemctl enable --now wazuh-agent".to_string()
    } else if std::path::Path::new("/etc/init.d/wazuh-agent").exists() {
        "/etc/init.d/wazuh-agent start".to_string()
    } else {
        format!("wazuh-agent --config {}", env.config.display())
    };
    let want = [
        format!("registered web-01 as {uuid} with {}", env.mock.mgmt_url()),
        format!("credentials: {}", env.data_dir().join("credentials.json").display()),
        format!("start the agent: {next}"),
    ];
    assert_eq!(lines, want, "{stderr}");

    // No secret in anything the command printed.
    let printed = text(&out);
    assert!(!printed.contains(&key) && !printed.contains(PASSWORD), "{printed}");
    // Every request carried the agent's User-Agent.
    assert!(env.mock.requests().iter().all(|r| r.user_agent.starts_with("wazuh-agent-rs/")));
}

#[test]
fn refuses_when_already_registered_without_force_and_sends_nothing() {
    let env = Env::new();
    let first = env.registered();
    let before = std::fs::read(env.data_dir().join("credentials.json")).unwrap();
    let requests = env.mock.requests().len();

    let out = env.register(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("already registered") && text(&out).contains("--force"), "{}", text(&out));
    assert_eq!(std::fs::read(env.data_dir().join("credentials.json")).unwrap(), before);
    assert_eq!(env.mock.requests().len(), requests, "no request sent");

    let out = env.register(&["--force"]);
    assert!(out.status.success(), "{}", text(&out));
    let second = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_ne!(first, second);
    assert_eq!(credentials(&env)["uuid"], second);
}

#[test]
fn wrong_password_is_refused_and_stores_nothing() {
    let env = Env::new();
    let pw = env.dir.path().join("wrong");
    std::fs::write(&pw, "not-the-password\n").unwrap();
    let out = env.cmd().args(["--register", "--user", "wazuh", "--password-file"]).arg(&pw).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("401") && t.contains("refused"), "{t}");
    assert!(!t.contains("not-the-password"));
    assert!(!env.data_dir().join("credentials.json").exists());
}

#[test]
fn server_400_is_reported_with_its_message() {
    let env = Env::new();
    env.mock.inject(Fault {
        path: "/agents".into(),
        times: 1,
        action: FaultAction::Status {
            code: 400,
            retry_after: None,
            body: Some(r#"{"title":"Bad Request","detail":"Agent name already in use"}"#.into()),
        },
    });
    let out = env.register(&[]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("400") && t.contains("Bad Request"), "{t}");
    assert!(!env.data_dir().join("credentials.json").exists());
    assert_eq!(agent_posts(&env), 1, "only the v4 refusal is retried");
}

/// A server's reason is printed on the terminal: its control characters (here a
/// clear-screen sequence) are escaped like in every log line.
#[test]
fn control_characters_in_a_refusal_are_escaped_on_the_terminal() {
    let env = Env::new();
    env.mock.inject(Fault {
        path: "/agents".into(),
        times: 1,
        action: FaultAction::Status {
            code: 400,
            retry_after: None,
            body: Some(r#"{"title":"Bad Request","detail":"evil\u001b[2J\u0007"}"#.into()),
        },
    });
    let out = env.register(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stderr.contains(&0x1b) && !out.stderr.contains(&0x07), "raw control bytes: {:?}", text(&out));
    assert!(text(&out).contains(r"evil\u{1b}[2J\u{7}"), "{}", text(&out));
}

const V4_NOTE: &str =
    "the server accepts only UUID v4 agent ids; registered with a v4 id. Set agent.uuid_version = 4 to skip this step.";

fn agent_posts(env: &Env) -> usize {
    env.mock.requests().iter().filter(|r| r.method == "POST" && r.path == "/agents").count()
}

fn refusal(detail: &str) -> FaultAction {
    let body = serde_json::json!({"title": "Bad Request", "detail": detail}).to_string();
    FaultAction::Status { code: 400, retry_after: None, body: Some(body) }
}

/// The Wazuh 6.0-era server takes v4 ids only: the v7 default is refused in its words (checked
/// in the mock's unit test), a v4 is sent at once, and the person is told once how to skip the step.
#[test]
fn a_v4_only_server_gets_a_v4_id_at_once_and_says_so_once() {
    let env = Env::with(|o| o.uuid_v4_only = true);
    let out = env.register(&[]);
    assert!(out.status.success(), "{}", text(&out));
    let uuid = credentials(&env)["uuid"].as_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&uuid).unwrap().get_version_num(), 4);
    assert_eq!(String::from_utf8(out.stdout.clone()).unwrap(), format!("{uuid}\n"), "stdout is the UUID alone");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().filter(|l| *l == V4_NOTE).count(), 1, "{stderr}");
    assert_eq!(agent_posts(&env), 2, "the refused v7, then the v4");
    assert_eq!(env.mock.agents().len(), 1);

    // With agent.uuid_version = 4 there is nothing to retry and nothing to say.
    env.write_config("agent.uuid_version = 4");
    let out = env.register(&["--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("UUID v4"), "{}", text(&out));
    assert_eq!(agent_posts(&env), 3);
}

/// One retry only, and only after that refusal: a v4 refused again is reported as usual and
/// nothing is stored.
#[test]
fn a_refused_retry_is_reported_and_stores_nothing() {
    let env = Env::new();
    env.mock.inject(Fault { path: "/agents".into(), times: 2, action: refusal("'x' is not a 'uuid4' - 'id'") });
    let out = env.register(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("refused to register the agent: 400 Bad Request: 'x' is not a 'uuid4' - 'id'"), "{t}");
    assert!(!t.contains(V4_NOTE), "{t}");
    assert_eq!(agent_posts(&env), 2);
    assert!(!env.data_dir().join("credentials.json").exists());
}

#[test]
fn invalid_name_and_key_are_refused_before_any_request() {
    let env = Env::new();
    let out = env.register(&["--name", "bad name/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("--name"), "{}", text(&out));
    let out = env.register(&["--key", "tooShortKeyValue"]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("--key") && !t.contains("tooShortKeyValue"), "{t}");
    assert!(env.mock.requests().is_empty());
}

#[test]
fn given_key_and_env_password_are_used() {
    let env = Env::new();
    let key = "abcdefghijklmnopqrstuvwxyz012345";
    let out = env
        .cmd()
        .args(["--register", "--user", "wazuh", "--key", key])
        .env("WAZUH_REGISTRATION_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(credentials(&env)["key"], key);
    assert_eq!(env.mock.agents()[0].key, key);
}

#[test]
fn missing_password_names_both_sources() {
    let env = Env::new();
    let out = env.cmd().args(["--register", "--user", "wazuh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("--password-file") && t.contains("WAZUH_REGISTRATION_PASSWORD"), "{t}");
}

#[test]
fn unreachable_server_fails_clearly() {
    let env = Env::new();
    let url = format!("https://127.0.0.1:{}", dead_port());
    let out = env.register(&["--url", &url]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("cannot connect") && t.contains("connection refused") && t.contains(&url), "{t}");
}

#[test]
fn tls_is_verified_by_default() {
    // Without the mock's CA, the webpki roots do not trust it.
    let env = Env::new();
    env.write_config("server.ca_file = \"\"");
    let out = env.register(&[]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("certificate") || t.contains("UnknownIssuer"), "{t}");
    assert!(env.mock.agents().is_empty());
}

#[test]
fn verify_certificate_accepts_a_name_mismatch_that_full_refuses() {
    let env = Env::with(|o| o.cert_names = vec!["wazuh-server.example".into()]);
    let out = env.register(&[]);
    assert_eq!(out.status.code(), Some(1), "full verification checks the name");
    assert!(text(&out).to_lowercase().contains("name"), "{}", text(&out));
    env.write_config("server.verify = \"certificate\"");
    env.registered();
}

#[test]
fn verify_none_accepts_an_unknown_ca() {
    let env = Env::new();
    env.write_config("server.ca_file = \"\"\nserver.verify = \"none\"");
    let out = env.register(&[]);
    assert!(out.status.success(), "{}", text(&out));
    // The password goes to a server nobody checked: said once, on stderr, before it is sent.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("server.verify = \"none\"")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("WARN") && warnings[0].contains("management password"), "{stderr}");
}

#[test]
fn an_unwritable_data_dir_fails_before_any_request() {
    let env = Env::new();
    let file = env.dir.path().join("regular-file");
    std::fs::write(&file, "").unwrap();
    let data_dir = file.join("data");
    env.write_config(&format!("agent.data_dir = {:?}", data_dir.display().to_string()));
    let out = env.register(&[]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains(&format!("cannot store credentials in agent.data_dir {}: ", data_dir.display())), "{t}");
    assert!(env.mock.requests().is_empty() && env.mock.agents().is_empty(), "the server was contacted: {t}");
}

#[test]
fn the_key_comes_from_a_file_or_the_environment() {
    let env = Env::new();
    let key_file = env.dir.path().join("key");
    std::fs::write(&key_file, "fromAfile0123456789abcdefghijklm\n").unwrap();
    let out = env.register(&["--key-file", key_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(credentials(&env)["key"], "fromAfile0123456789abcdefghijklm");

    let key = "fromTheEnvironment0123456789abcd";
    let out = env.register_with_env_args(&[("WAZUH_REGISTRATION_KEY", key)], &["--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(credentials(&env)["key"], key);

    // A bad key names where it came from, never the key.
    std::fs::write(&key_file, "notAKey!\n").unwrap();
    let out = env.register(&["--force", "--key-file", key_file.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.code() == Some(1) && t.contains("--key-file") && !t.contains("notAKey"), "{t}");
    let out = env.register_with_env_args(&[("WAZUH_REGISTRATION_KEY", "short")], &["--force"]);
    let t = text(&out);
    assert!(out.status.code() == Some(1) && t.contains("WAZUH_REGISTRATION_KEY") && !t.contains("short"), "{t}");
    std::fs::write(&key_file, "\n").unwrap();
    let t = text(&env.register(&["--force", "--key-file", key_file.to_str().unwrap()]));
    assert!(t.contains(&format!("--key-file {}: the first line is empty", key_file.display())), "{t}");
    assert_eq!(env.mock.agents().len(), 2, "the refusals sent nothing");
}

#[test]
fn registers_through_an_explicit_connect_proxy_with_credentials() {
    use base64::Engine as _;
    let env = Env::new();
    let proxy = ConnectProxy::start(Some(&base64::engine::general_purpose::STANDARD.encode("pu:pp")));
    env.write_config(&format!("server.proxy = \"http://pu:pp@127.0.0.1:{}\"", proxy.port));
    env.registered();
    assert!(proxy.tunnels.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the request went through the proxy");

    // Proxy variables in the environment are ignored: a dead proxy there changes nothing.
    std::fs::remove_file(env.data_dir().join("credentials.json")).unwrap();
    env.write_config("");
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let out = env.register_with_env(&[("HTTPS_PROXY", &dead), ("https_proxy", &dead), ("ALL_PROXY", &dead)]);
    assert!(out.status.success(), "{}", text(&out));
}
