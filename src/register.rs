//! One-shot registration with the server management API (docs/protocol.md, Registration).
//!
//! Order matters: every local check (credentials, arguments, password, a writable data_dir) comes
//! before the first request, so no half-registered agent is left; credentials are written after 201.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use uuid::{NoContext, Timestamp, Uuid};

use crate::config::{self, Config, UuidVersion, Verify};
use crate::credentials::{Credentials, CredentialsError, Secret};
use crate::host;
use crate::http::{self, Attempt, HttpError, Outcome, Request};

/// Environment variable holding the registration password.
pub const ENV_PASSWORD: &str = "WAZUH_REGISTRATION_PASSWORD";
/// Environment variable holding the agent key (instead of `--key`, which `ps` shows).
pub const ENV_KEY: &str = "WAZUH_REGISTRATION_KEY";

/// The `--register` arguments, already parsed from the command line.
#[derive(Debug, Clone, Default)]
pub struct RegisterArgs {
    pub url: Option<String>,
    pub user: String,
    pub password_file: Option<PathBuf>,
    /// `--password`: accepted for convenience, but visible in `ps`.
    pub password: Option<Secret>,
    pub name: Option<String>,
    pub key: Option<Secret>,
    pub key_file: Option<PathBuf>,
    pub force: bool,
}

/// Why registration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Credentials exist and `--force` was not given; nothing was sent.
    #[error(
        "the agent is already registered ({} exists); use --force to register again with a new identity",
        .path.display()
    )]
    AlreadyRegistered { path: PathBuf },
    /// A flag's value is unusable (the flag is named).
    #[error("{flag}: {message}")]
    InvalidArgument { flag: &'static str, message: String },
    #[error("no registration password: give --password-file FILE or set {}", ENV_PASSWORD)]
    NoPassword,
    /// `--password-file` or `--key-file` could not be read or its first line is empty.
    #[error("{flag} {}: {message}", .path.display())]
    SecretFile { flag: &'static str, path: PathBuf, message: String },
    /// `agent.data_dir` cannot hold the credentials; nothing was sent.
    #[error("cannot store credentials in agent.data_dir {}: {source} (fix its path or permissions)", .path.display())]
    DataDir { path: PathBuf, source: std::io::Error },
    /// The HTTPS client could not be set up (CA file, proxy).
    #[error("{0}")]
    Http(#[source] HttpError),
    /// The management API could not be reached (connect, TLS, timeout).
    #[error("cannot connect to the management API at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("login to {url} refused: {status} {message} (check --user and the password)")]
    LoginRefused { url: String, status: u16, message: String },
    #[error("{url} refused to register the agent: {status} {message}")]
    Refused { url: String, status: u16, message: String },
    #[error("unexpected answer from {url}: {message}")]
    BadAnswer { url: String, message: String },
    #[error("the server registered the agent, but {0}")]
    Store(#[source] CredentialsError),
}

/// A new agent key: 32 characters from `[A-Za-z0-9]`, drawn from the OS random source.
pub fn generate_key() -> Result<Secret, getrandom::Error> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut key = String::with_capacity(32);
    let mut buf = [0u8; 64];
    while key.len() < 32 {
        getrandom::fill(&mut buf)?;
        // Rejection sampling: 248 = 4 * 62, so every accepted byte maps without bias.
        let accepted = buf.iter().filter(|b| **b < 248).map(|b| ALPHABET[(*b % 62) as usize] as char);
        key.extend(accepted.take(32 - key.len()));
    }
    Ok(Secret::new(key))
}

/// Checks a user-supplied key: exactly 32 ASCII letters or digits.
pub fn validate_key(key: &str) -> Result<(), String> {
    // The message never includes the key itself.
    if key.len() != 32 || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("the key must be exactly 32 letters or digits (got {} characters)", key.chars().count()));
    }
    Ok(())
}

/// A secret from the first line of `file`, else the flag's `value`, else env `var`; and its source.
fn secret(
    (file, flag, value, var): (&Option<PathBuf>, &'static str, &Option<Secret>, &'static str),
) -> Result<Option<(Secret, &'static str)>, RegisterError> {
    if let Some(path) = file {
        let bad = |message: String| RegisterError::SecretFile { flag, path: path.clone(), message };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if first.is_empty() {
            return Err(bad("the first line is empty".into()));
        }
        return Ok(Some((Secret::new(first.to_string()), flag)));
    }
    let from_env = std::env::var(var).ok().filter(|v| !v.is_empty()).map(|v| (Secret::new(v), var));
    Ok(value.clone().map(|v| (v, flag.trim_end_matches("-file"))).or(from_env))
}

fn new_uuid(version: UuidVersion) -> String {
    // Display is hyphenated lowercase. NoContext: one id per run needs no shared counter (~1 KB of binary).
    let id = if version == UuidVersion::V7 { Uuid::new_v7(Timestamp::now(NoContext)) } else { Uuid::new_v4() };
    id.to_string()
}

fn unreachable_or_bad(url: &str, result: &Result<http::Reply, ureq::Error>) -> RegisterError {
    match result {
        Err(e) => RegisterError::Unreachable { url: url.to_string(), message: http::describe_transport(e) },
        Ok(r) => RegisterError::BadAnswer { url: url.to_string(), message: format!("{} {}", r.status, r.message()) },
    }
}

/// Registers the agent and stores its credentials; returns them (the caller prints the UUID) and tells the person.
pub fn register(config: &Config, args: &RegisterArgs) -> Result<Credentials, RegisterError> {
    let data_dir = &config.agent.data_dir;
    let path = Credentials::path(data_dir);
    if path.exists() && !args.force {
        return Err(RegisterError::AlreadyRegistered { path });
    }
    let invalid = |flag| move |message| RegisterError::InvalidArgument { flag, message };
    let url = match &args.url {
        Some(u) => config::validate_https_url(u).map_err(invalid("--url"))?,
        None => config.server.registration_url.clone(),
    };
    if args.user.is_empty() || args.user.contains(':') {
        return Err(invalid("--user")("is required and must not contain ':'".into()));
    }
    let name = [args.name.as_deref().unwrap_or_default(), &config.agent.name].into_iter().find(|n| !n.is_empty());
    let name = name.map_or_else(host::hostname, str::to_string);
    // agent.name was checked at load; --name and the host name are checked here.
    let hint = "give a valid --name (without it: agent.name, else the host name)";
    config::validate_agent_name(&name).map_err(|m| invalid("--name")(format!("{m}; {hint}")))?;
    let key = match secret((&args.key_file, "--key-file", &args.key, ENV_KEY))? {
        Some((k, flag)) => {
            validate_key(k.expose()).map_err(invalid(flag))?;
            k
        }
        None => generate_key()
            .map_err(|e| invalid("--key-file")(format!("the OS random source failed ({e}); give a key")))?,
    };
    let password = secret((&args.password_file, "--password-file", &args.password, ENV_PASSWORD))?;
    let password = password.ok_or(RegisterError::NoPassword)?.0;
    // A data_dir that cannot hold the credentials would leave an orphan agent on the server:
    // created as store() does, and a file made in it (`create_new` never follows a link).
    let probe = data_dir.join(".credentials.probe");
    let _ = std::fs::remove_file(&probe);
    crate::fsutil::ensure_private_dir(data_dir)
        .and_then(|()| std::fs::File::create_new(&probe).and_then(|_| std::fs::remove_file(&probe)))
        .map_err(|source| RegisterError::DataDir { path: data_dir.clone(), source })?;
    if config.server.verify == Verify::None {
        log::warn!("server.verify = \"none\": certificate NOT checked; an impostor gets the management password");
    }

    // Registration is interactive and one-shot: a short bound on each request.
    let mut server = config.server.clone();
    server.request_timeout = server.request_timeout.min(Duration::from_secs(30));
    let agent = http::build_agent(&server, server.request_timeout).map_err(RegisterError::Http)?;

    // 1. Log in to the management API.
    let login_url = format!("{url}/security/user/authenticate");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", args.user, password.expose()));
    let result = http::send(&agent, &login_url, Some(&format!("Basic {basic}")), &Request::Post, None);
    // Registration never retries: no cap for a Retry-After.
    let api_token = match (http::classify(Attempt::of(&result, false), SystemTime::now(), Duration::ZERO), result) {
        (Outcome::Done, Ok(r)) if r.status == 200 => {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            let Some(token) = body.pointer("/data/token").and_then(serde_json::Value::as_str) else {
                let message = "200 without data.token in the body".into();
                return Err(RegisterError::BadAnswer { url: login_url, message });
            };
            Secret::new(token.to_string())
        }
        (Outcome::Reauth, Ok(r)) => {
            return Err(RegisterError::LoginRefused { url: login_url, status: r.status, message: r.message() });
        }
        (_, result) => return Err(unreachable_or_bad(&login_url, &result)),
    };

    // 2. Create the agent. A server that takes only v4 ids (Wazuh 6.0) gets one more try with a v4.
    let host = host::gather(&config.inventory.root);
    let agents_url = format!("{url}/agents");
    let bearer = format!("Bearer {}", api_token.expose());
    let mut version = config.agent.uuid_version;
    let uuid = loop {
        let uuid = new_uuid(version);
        let body = serde_json::json!({
            "id": uuid, "key": key.expose(), "name": name, "type": "Endpoint", "version": crate::VERSION, "host": host,
        });
        let result = http::send(&agent, &agents_url, Some(&bearer), &Request::Json(body.to_string().as_bytes()), None);
        match (http::classify(Attempt::of(&result, false), SystemTime::now(), Duration::ZERO), result) {
            // Only 201 means created (docs/protocol.md, Registration); a 200 could be a proxy or another API.
            (Outcome::Done, Ok(r)) if r.status == 201 => break uuid,
            (_, Ok(r)) if version != UuidVersion::V4 && r.status == 400 && refuses_non_v4(&r.message()) => {
                version = UuidVersion::V4;
            }
            // A refusal of this agent: 401/403, 400, 413, and also 408/429 (no retry here).
            (Outcome::Reauth | Outcome::Reject(_) | Outcome::Retry { .. }, Ok(r)) if (400..500).contains(&r.status) => {
                return Err(RegisterError::Refused { url: agents_url, status: r.status, message: r.message() });
            }
            (_, result) => return Err(unreachable_or_bad(&agents_url, &result)),
        }
    };

    // 3. Store the credentials.
    let creds = Credentials { uuid, key, name };
    creds.store(data_dir).map_err(RegisterError::Store)?;
    // Standard output is the UUID alone (scripts read it); this summary is for the person.
    let note = if version == config.agent.uuid_version { "" } else { V4_NOTE };
    let init = |p: &str| Path::new(p).exists();
    let next = next_step(init("/run/systemd/system"), init("/etc/init.d/wazuh-agent"), config.source.as_deref());
    let (name, uuid, path) = (&creds.name, &creds.uuid, path.display());
    let _ = write!(
        std::io::stderr(),
        "{note}registered {name} as {uuid} with {url}\ncredentials: {path}\nstart the agent: {next}\n"
    );
    Ok(creds)
}

/// Said once when the server refused the configured id version and took a v4.
const V4_NOTE: &str = "the server accepts only UUID v4 agent ids; registered with a v4 id. Set agent.uuid_version = 4 to skip this step.\n";

/// The 400 of a server that validates v4 ids only: "'<id>' is not a 'uuid4' - 'id'" (Wazuh 6.0), "… not a valid UUIDv4".
fn refuses_non_v4(message: &str) -> bool {
    ["'uuid4'", "UUIDv4"].iter().any(|m| message.contains(m))
}

/// How to start the agent, from the facts: systemd runs, an /etc/init.d script exists, the config file.
pub fn next_step(systemd: bool, init_script: bool, config: Option<&Path>) -> std::borrow::Cow<'static, str> {
    match (systemd, init_script, config) {
        (true, ..) => "systemctl enable --now wazuh-agent".into(),
        (_, true, _) => "/etc/init.d/wazuh-agent start".into(),
        (.., Some(path)) => format!("wazuh-agent --config {}", path.display()).into(),
        (.., None) => "wazuh-agent".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_32_alphanumerics_and_differ() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert!(validate_key(a.expose()).is_ok());
        assert_ne!(a, b);
    }

    #[test]
    fn key_validation_never_echoes_the_key() {
        for bad in ["short", &"x".repeat(33), &format!("{}!", "a".repeat(31)), &"é".repeat(16)] {
            let e = validate_key(bad).unwrap_err();
            assert!(!e.contains(bad), "{e}");
        }
    }

    #[test]
    fn uuid_versions() {
        assert_eq!(uuid::Uuid::parse_str(&new_uuid(UuidVersion::V7)).unwrap().get_version_num(), 7);
        assert_eq!(uuid::Uuid::parse_str(&new_uuid(UuidVersion::V4)).unwrap().get_version_num(), 4);
    }

    #[test]
    fn only_the_v4_refusal_is_recognised() {
        assert!(refuses_non_v4("Bad Request: '01a22bde-0000-7000-8000-000000000000' is not a 'uuid4' - 'id'"));
        assert!(refuses_non_v4("Bad Request: 'x' is not a valid UUIDv4"));
        for other in ["Bad Request: Agent name already in use", "Bad Request: 'x' is not a valid UUID", "uuid4"] {
            assert!(!refuses_non_v4(other), "{other}");
        }
    }

    #[test]
    fn next_step_follows_the_init_system() {
        let config = Some(Path::new("/etc/wazuh-agent/wazuh-agent.toml"));
        assert_eq!(next_step(true, true, config), "systemctl enable --now wazuh-agent");
        assert_eq!(next_step(false, true, config), "/etc/init.d/wazuh-agent start");
        assert_eq!(next_step(false, false, config), "wazuh-agent --config /etc/wazuh-agent/wazuh-agent.toml");
        assert_eq!(next_step(false, false, None), "wazuh-agent");
    }
}
