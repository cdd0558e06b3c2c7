//! Configuration: the TOML file (docs/configuration.md) parsed once into one immutable, typed [`Config`].
//!
//! Parsing happens in two steps: serde reads the file into `Raw*` structs whose fields are
//! as loose as TOML itself (strings for durations, string-or-integer for sizes), then
//! [`Config::from_raw`] turns each field into its typed value, naming the key on failure.
//! After that nothing in the agent re-checks a setting.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the configuration is read from when neither `--config` nor the environment says.
pub const DEFAULT_PATH: &str = "/etc/wazuh-agent/wazuh-agent.toml";
/// Environment variable that overrides [`DEFAULT_PATH`] (the `--config` flag wins over it).
pub const ENV_CONFIG: &str = "WAZUH_AGENT_CONFIG";

/// Why a configuration could not be loaded.
#[derive(Debug)]
pub enum ConfigError {
    /// The file named explicitly (flag or environment) could not be read.
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    Syntax { path: PathBuf, key: Option<String>, message: String },
    /// A key has a value of the right type that the agent does not accept.
    Invalid { key: String, message: String },
    /// A server group file makes the configuration invalid.
    Group { file: String, message: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read config file {}: {source}", path.display())
            }
            ConfigError::Syntax { path, key: Some(key), message } => {
                write!(f, "config file {}: key `{key}`: {message}", path.display())
            }
            ConfigError::Syntax { path, key: None, message } => {
                write!(f, "config file {}: {message}", path.display())
            }
            ConfigError::Invalid { key, message } => write!(f, "config key `{key}`: {message}"),
            ConfigError::Group { file, message } => write!(f, "group file {file}: {message}"),
        }
    }
}

impl std::error::Error for ConfigError {}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), message: message.into() }
}

/// UUID version the agent generates at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UuidVersion {
    V4,
    V7,
}

/// How the server's TLS certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Chain to a trusted root and a name matching the URL's host.
    Full,
    /// Chain to a trusted root; the host name is not checked (servers reached by IP).
    Certificate,
    /// Nothing is checked. Loudly warned about at every start.
    None,
}

/// Compression of request bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// What happens when the stateless ring buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    DropOldest,
    Block,
}

/// Where the logcollector starts in a file it has never seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    End,
    Beginning,
}

/// Every key of the configuration, by section. Server group files may set exactly these
/// (under the same names); anything else in them is ignored.
pub const KNOWN_KEYS: &[(&str, &[&str])] = &[
    ("agent", &["name", "data_dir", "run_dir", "uuid_version", "user", "group"]),
    (
        "server",
        &[
            "url",
            "registration_url",
            "verify",
            "ca_file",
            "proxy",
            "compression",
            "request_timeout",
            "commands_timeout",
        ],
    ),
    (
        "events",
        &["batch_max_bytes", "batch_max_events", "batch_interval", "buffer_events", "overflow", "queue_max_bytes"],
    ),
    ("retry", &["initial", "max"]),
    ("logcollector", &["files", "start", "max_line_bytes", "poll_interval"]),
    ("inventory", &["enabled", "interval", "root", "collectors"]),
    ("log", &["level", "file", "syslog"]),
];

/// One entry of `logcollector.files`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub pattern: String,
    /// Overrides `logcollector.start` for files this entry matches.
    pub start: Option<Start>,
}

/// Inventory collectors that can be switched on.
pub const COLLECTORS: &[&str] = &["system", "hardware", "packages", "networks", "ports", "processes"];

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Name to register with; empty means the host name.
    pub name: String,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub uuid_version: UuidVersion,
    /// Run as this user (and `group`) after start-up; `None`: stay as started.
    pub user: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Comms API base URLs, tried in order (failover). Never empty.
    pub urls: Vec<String>,
    /// Management API base URL.
    pub registration_url: String,
    pub verify: Verify,
    pub ca_file: Option<PathBuf>,
    /// `http://[user:pass@]host:port`, validated; never read from the environment.
    pub proxy: Option<String>,
    pub compression: Compression,
    pub request_timeout: Duration,
    pub commands_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct EventsConfig {
    pub batch_max_bytes: u64,
    pub batch_max_events: usize,
    pub batch_interval: Duration,
    pub buffer_events: usize,
    pub overflow: Overflow,
    pub queue_max_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub initial: Duration,
    pub max: Duration,
}

#[derive(Debug, Clone)]
pub struct LogcollectorConfig {
    /// Paths or glob patterns, each with its own `start` if it was given one.
    pub files: Vec<FileSpec>,
    pub start: Start,
    /// Longer lines are cut here and tagged `truncated`.
    pub max_line_bytes: usize,
    /// How often followed files are checked for new lines, rotation and truncation.
    pub poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct InventoryConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub root: PathBuf,
    pub collectors: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: log::LevelFilter,
    pub file: Option<PathBuf>,
    /// Also log to the system log (libc syslog, facility daemon).
    pub syslog: bool,
}

/// The whole, validated configuration. Built once, then passed by reference.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, if any (absent when the default path does not exist).
    pub source: Option<PathBuf>,
    pub agent: AgentConfig,
    pub server: ServerConfig,
    pub events: EventsConfig,
    pub retry: RetryConfig,
    pub logcollector: LogcollectorConfig,
    pub inventory: InventoryConfig,
    pub log: LogConfig,
}

// ---------------------------------------------------------------------------------------
// Raw (serde) side. Defaults here are the documented defaults of docs/configuration.md and etc/.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    agent: RawAgent,
    server: RawServer,
    events: RawEvents,
    retry: RawRetry,
    logcollector: RawLogcollector,
    inventory: RawInventory,
    log: RawLog,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAgent {
    name: String,
    data_dir: String,
    run_dir: String,
    uuid_version: i64,
    user: String,
    group: String,
}

impl Default for RawAgent {
    fn default() -> Self {
        RawAgent {
            name: String::new(),
            data_dir: "/var/lib/wazuh-agent".into(),
            run_dir: "/run/wazuh-agent".into(),
            uuid_version: 7,
            user: String::new(),
            group: String::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    url: OneOrMany,
    registration_url: String,
    verify: String,
    ca_file: String,
    proxy: String,
    compression: String,
    request_timeout: String,
    commands_timeout: String,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            url: OneOrMany::One("https://localhost:27000".into()),
            registration_url: "https://localhost:55000".into(),
            verify: "full".into(),
            ca_file: String::new(),
            proxy: String::new(),
            compression: "none".into(),
            request_timeout: "30s".into(),
            commands_timeout: "11m".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawEvents {
    batch_max_bytes: RawSize,
    batch_max_events: i64,
    batch_interval: String,
    buffer_events: i64,
    overflow: String,
    queue_max_bytes: RawSize,
}

impl Default for RawEvents {
    fn default() -> Self {
        RawEvents {
            batch_max_bytes: RawSize::Text("1MB".into()),
            batch_max_events: 10_000,
            batch_interval: "1s".into(),
            buffer_events: 10_000,
            overflow: "drop_oldest".into(),
            queue_max_bytes: RawSize::Text("256MB".into()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetry {
    initial: String,
    max: String,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry { initial: "1s".into(), max: "60s".into() }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawFile {
    Path(String),
    Spec(RawFileSpec),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSpec {
    path: String,
    #[serde(default)]
    start: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLogcollector {
    files: Vec<RawFile>,
    start: String,
    max_line_bytes: RawSize,
    poll_interval: String,
}

impl Default for RawLogcollector {
    fn default() -> Self {
        RawLogcollector {
            files: Vec::new(),
            start: "end".into(),
            max_line_bytes: RawSize::Text("64KiB".into()),
            poll_interval: "1s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawInventory {
    enabled: bool,
    interval: String,
    root: String,
    collectors: Vec<String>,
}

impl Default for RawInventory {
    fn default() -> Self {
        RawInventory {
            enabled: true,
            interval: "1h".into(),
            root: "/".into(),
            collectors: ["system", "hardware", "packages", "networks", "ports"].iter().map(|s| s.to_string()).collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
    file: String,
    syslog: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { level: "info".into(), file: String::new(), syslog: false }
    }
}

// ---------------------------------------------------------------------------------------
// Value parsers (pure).

/// Splits `" 10 KiB "` into `(10, "KiB")`; `what` completes "… is not <what>".
fn split_number<'a>(text: &'a str, what: &str) -> Result<(u64, &'a str), String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("{text:?} is not {what}"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is too large"))?;
    Ok((n, unit.trim()))
}

/// Parses `"250ms"`, `"10s"`, `"11m"`, `"1h"`, `"2d"`. A bare number is refused: a unit
/// is required so `timeout = 30` cannot be misread as milliseconds or minutes.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (n, unit) = split_number(text, "a duration (examples: \"250ms\", \"10s\", \"11m\", \"1h\")")?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(format!("{text:?} needs a unit (ms, s, m, h or d)")),
        other => return Err(format!("{text:?} has an unknown unit {other:?} (ms, s, m, h or d)")),
    };
    n.checked_mul(ms_per_unit).map(Duration::from_millis).ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a size: an integer number of bytes, or a string such as `"64KiB"`, `"1MB"`.
/// KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024 (as written on the tin).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (n, unit) = split_number(text, "a size (examples: 1048576, \"64KiB\", \"1MB\")")?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => {
            return Err(format!("{text:?} has an unknown unit {other:?} (B, KB, MB, GB, KiB, MiB, GiB)"));
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("{text:?} is too large"))
}

fn size(key: &str, raw: &RawSize) -> Result<u64, ConfigError> {
    match raw {
        RawSize::Bytes(n) if *n >= 0 => Ok(*n as u64),
        RawSize::Bytes(n) => Err(invalid(key, format!("{n} is negative"))),
        RawSize::Text(t) => parse_size(t).map_err(|m| invalid(key, m)),
    }
}

fn duration(key: &str, text: &str, min: Duration) -> Result<Duration, ConfigError> {
    let d = parse_duration(text).map_err(|m| invalid(key, m))?;
    if d < min {
        return Err(invalid(key, format!("{text:?} is below the minimum of {}", fmt_duration(min))));
    }
    Ok(d)
}

fn choice<T: Copy>(key: &str, text: &str, options: &[(&str, T)]) -> Result<T, ConfigError> {
    options.iter().find(|(name, _)| *name == text).map(|(_, v)| *v).ok_or_else(|| {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        invalid(key, format!("{text:?} is not one of {}", names.join(" | ")))
    })
}

fn count(key: &str, n: i64, min: i64, max: i64) -> Result<usize, ConfigError> {
    if n < min || n > max {
        return Err(invalid(key, format!("{n} is outside {min}..={max}")));
    }
    Ok(n as usize)
}

/// Checks an agent name against the server's rule `^[\w\-.%]+$`, at most 128 characters.
pub fn validate_agent_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.chars().count() > 128 {
        return Err(format!("the name is {} characters long; at most 128 are allowed", name.chars().count()));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '%'))) {
        return Err(format!(
            "the name {name:?} contains {bad:?}; only letters, digits, '_', '-', '.' and '%' are allowed"
        ));
    }
    Ok(())
}

/// Validates a base URL: `https://host[:port][/prefix]`, returned without a trailing slash.
pub fn validate_https_url(text: &str) -> Result<String, String> {
    let uri: ureq::http::Uri = text.parse().map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{text:?} must start with https:// (the agent only speaks TLS)"));
    }
    match uri.authority() {
        Some(a) if !a.host().is_empty() => {}
        _ => return Err(format!("{text:?} has no host")),
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!("{text:?} must not carry credentials"));
    }
    if uri.query().is_some() {
        return Err(format!("{text:?} must not have a query"));
    }
    Ok(text.trim_end_matches('/').to_string())
}

fn validate_proxy(text: &str) -> Result<String, String> {
    // Never echo the text back: it may carry a password.
    if !text.starts_with("http://") {
        return Err("must be http://[user:pass@]host:port (HTTP CONNECT proxy)".into());
    }
    ureq::Proxy::new(text).map_err(|e| format!("is not a valid proxy URL: {e}"))?;
    Ok(text.to_string())
}

impl Config {
    /// The configuration with every key at its default (as if the file were empty).
    pub fn defaults() -> Config {
        // The defaults are valid by construction; the unit test `defaults_are_valid` holds
        // this to account.
        match Config::from_raw(RawConfig::default(), None) {
            Ok(c) => c,
            Err(e) => unreachable!("built-in defaults are invalid: {e}"),
        }
    }

    /// Parses TOML text. `path` is only used in messages and recorded as the source.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let key = e.span().and_then(|span| key_at(text, span.start));
            ConfigError::Syntax { path: path.to_path_buf(), key, message: e.message().trim().to_string() }
        })?;
        Config::from_raw(raw, Some(path.to_path_buf()))
    }

    /// Loads the configuration. `explicit` is the `--config` flag; otherwise the
    /// `WAZUH_AGENT_CONFIG` variable, otherwise [`DEFAULT_PATH`]. A file named explicitly
    /// (flag or variable) must exist; a missing default file means all defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os(ENV_CONFIG).filter(|v| !v.is_empty()).map(PathBuf::from);
        let (path, required) = match (explicit, from_env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(Config::defaults()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// The local file (`text`, already known to be valid) with `overlays` applied in
    /// order: `(file name, section → key → value)`, keys as in [`KNOWN_KEYS`]. The result
    /// is validated after each overlay, so an error names the group file at fault.
    pub fn with_overlays(
        text: &str,
        source: Option<&Path>,
        overlays: &[(String, toml::Table)],
    ) -> Result<Config, ConfigError> {
        let path = source.map(Path::to_path_buf).unwrap_or_default();
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.clone(),
            key: e.span().and_then(|span| key_at(text, span.start)),
            message: e.message().trim().to_string(),
        })?;
        let mut config = Config::parse(text, &path)?;
        for (file, overlay) in overlays {
            for (section, values) in overlay {
                let toml::Value::Table(values) = values else { continue };
                let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(t) = entry {
                    for (k, v) in values {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
            let raw: RawConfig = toml::Value::Table(table.clone()).try_into().map_err(|e: toml::de::Error| {
                ConfigError::Group { file: file.clone(), message: e.message().trim().to_string() }
            })?;
            config = Config::from_raw(raw, source.map(Path::to_path_buf))
                .map_err(|e| ConfigError::Group { file: file.clone(), message: e.to_string() })?;
        }
        Ok(config)
    }

    /// The keys (`section.key`) whose effective values differ between two configurations.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        let a = self.render();
        let b = other.render();
        a.lines()
            .zip(b.lines())
            .filter(|(x, y)| x != y)
            .filter_map(|(x, _)| x.split(" = ").next().map(str::to_string))
            .collect()
    }

    fn from_raw(raw: RawConfig, source: Option<PathBuf>) -> Result<Config, ConfigError> {
        let RawConfig { agent, server, events, retry, logcollector, inventory, log } = raw;

        if !agent.name.is_empty() {
            validate_agent_name(&agent.name).map_err(|m| invalid("agent.name", m))?;
        }
        let uuid_version = match agent.uuid_version {
            4 => UuidVersion::V4,
            7 => UuidVersion::V7,
            n => return Err(invalid("agent.uuid_version", format!("{n} is not 4 or 7"))),
        };
        let dir = |key: &str, v: String| -> Result<PathBuf, ConfigError> {
            if v.is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
            let p = PathBuf::from(v);
            if !p.is_absolute() {
                return Err(invalid(key, format!("{} is not an absolute path", p.display())));
            }
            Ok(p)
        };
        let account = |key: &str, v: String| -> Result<Option<String>, ConfigError> {
            if v.is_empty() {
                return Ok(None);
            }
            if v.starts_with('-') || v.chars().any(|c| c.is_whitespace() || c == ':' || c == '/') {
                return Err(invalid(key, format!("{v:?} is not a valid account name")));
            }
            Ok(Some(v))
        };
        let agent = AgentConfig {
            name: agent.name,
            data_dir: dir("agent.data_dir", agent.data_dir)?,
            run_dir: dir("agent.run_dir", agent.run_dir)?,
            uuid_version,
            user: account("agent.user", agent.user)?,
            group: account("agent.group", agent.group)?,
        };
        if agent.group.is_some() && agent.user.is_none() {
            return Err(invalid("agent.group", "needs agent.user"));
        }

        let urls = match server.url {
            OneOrMany::One(u) => vec![u],
            OneOrMany::Many(v) => v,
        };
        if urls.is_empty() {
            return Err(invalid("server.url", "the list is empty; give at least one https:// URL"));
        }
        let urls = urls
            .iter()
            .map(|u| validate_https_url(u).map_err(|m| invalid("server.url", m)))
            .collect::<Result<Vec<_>, _>>()?;
        let request_timeout = duration("server.request_timeout", &server.request_timeout, Duration::from_secs(1))?;
        let commands_timeout = duration("server.commands_timeout", &server.commands_timeout, Duration::from_secs(1))?;
        let server = ServerConfig {
            urls,
            registration_url: validate_https_url(&server.registration_url)
                .map_err(|m| invalid("server.registration_url", m))?,
            verify: choice(
                "server.verify",
                &server.verify,
                &[("full", Verify::Full), ("certificate", Verify::Certificate), ("none", Verify::None)],
            )?,
            ca_file: (!server.ca_file.is_empty()).then(|| PathBuf::from(&server.ca_file)),
            proxy: if server.proxy.is_empty() {
                None
            } else {
                Some(validate_proxy(&server.proxy).map_err(|m| invalid("server.proxy", m))?)
            },
            compression: choice(
                "server.compression",
                &server.compression,
                &[("none", Compression::None), ("gzip", Compression::Gzip)],
            )?,
            request_timeout,
            commands_timeout,
        };

        let batch_max_bytes = size("events.batch_max_bytes", &events.batch_max_bytes)?;
        // Below 1 KiB not even the agent metadata line fits; above 64 MiB no server accepts it.
        if !(1024..=64 << 20).contains(&batch_max_bytes) {
            return Err(invalid("events.batch_max_bytes", format!("{batch_max_bytes} is outside 1KiB..=64MiB")));
        }
        let queue_max_bytes = size("events.queue_max_bytes", &events.queue_max_bytes)?;
        if queue_max_bytes < batch_max_bytes {
            return Err(invalid(
                "events.queue_max_bytes",
                format!("{queue_max_bytes} is smaller than events.batch_max_bytes ({batch_max_bytes})"),
            ));
        }
        let events = EventsConfig {
            batch_max_bytes,
            batch_max_events: count("events.batch_max_events", events.batch_max_events, 1, 1_000_000)?,
            batch_interval: duration("events.batch_interval", &events.batch_interval, Duration::from_millis(1))?,
            buffer_events: count("events.buffer_events", events.buffer_events, 1, 10_000_000)?,
            overflow: choice(
                "events.overflow",
                &events.overflow,
                &[("drop_oldest", Overflow::DropOldest), ("block", Overflow::Block)],
            )?,
            queue_max_bytes,
        };

        let initial = duration("retry.initial", &retry.initial, Duration::from_millis(1))?;
        let max = duration("retry.max", &retry.max, Duration::from_millis(1))?;
        if max < initial {
            return Err(invalid(
                "retry.max",
                format!("{} is smaller than retry.initial ({})", retry.max, retry.initial),
            ));
        }
        let retry = RetryConfig { initial, max };

        let starts = [("end", Start::End), ("beginning", Start::Beginning)];
        let mut files = Vec::with_capacity(logcollector.files.len());
        for f in logcollector.files {
            let (pattern, start) = match f {
                RawFile::Path(p) => (p, None),
                RawFile::Spec(RawFileSpec { path, start }) => {
                    let start = match start {
                        Some(s) => Some(choice("logcollector.files.start", &s, &starts)?),
                        None => None,
                    };
                    (path, start)
                }
            };
            if pattern.trim().is_empty() {
                return Err(invalid("logcollector.files", format!("{pattern:?} is an empty path")));
            }
            if !pattern.starts_with('/') {
                return Err(invalid("logcollector.files", format!("{pattern:?} is not an absolute path")));
            }
            if glob::Pattern::new(&pattern).is_err() {
                return Err(invalid("logcollector.files", format!("{pattern:?} is not a valid glob pattern")));
            }
            files.push(FileSpec { pattern, start });
        }
        let max_line_bytes = size("logcollector.max_line_bytes", &logcollector.max_line_bytes)?;
        // A line must fit an event line of the ingest format (1 MiB) with its JSON around it.
        if !(256..=512 << 10).contains(&max_line_bytes) {
            return Err(invalid("logcollector.max_line_bytes", format!("{max_line_bytes} is outside 256..=512KiB")));
        }
        let logcollector = LogcollectorConfig {
            max_line_bytes: max_line_bytes as usize,
            poll_interval: duration(
                "logcollector.poll_interval",
                &logcollector.poll_interval,
                Duration::from_millis(10),
            )?,
            start: choice(
                "logcollector.start",
                &logcollector.start,
                &[("end", Start::End), ("beginning", Start::Beginning)],
            )?,
            files,
        };

        let mut collectors: Vec<String> = Vec::new();
        for c in inventory.collectors {
            if !COLLECTORS.contains(&c.as_str()) {
                return Err(invalid("inventory.collectors", format!("{c:?} is not one of {}", COLLECTORS.join(", "))));
            }
            if collectors.contains(&c) {
                return Err(invalid("inventory.collectors", format!("{c:?} is listed twice")));
            }
            collectors.push(c);
        }
        let inventory = InventoryConfig {
            enabled: inventory.enabled,
            interval: duration("inventory.interval", &inventory.interval, Duration::from_secs(1))?,
            root: dir("inventory.root", inventory.root)?,
            collectors,
        };

        use log::LevelFilter as L;
        let log = LogConfig {
            level: choice(
                "log.level",
                &log.level,
                &[("error", L::Error), ("warn", L::Warn), ("info", L::Info), ("debug", L::Debug), ("trace", L::Trace)],
            )?,
            file: (!log.file.is_empty()).then(|| PathBuf::from(log.file)),
            syslog: log.syslog,
        };

        Ok(Config { source, agent, server, events, retry, logcollector, inventory, log })
    }

    /// The effective values, one `section.key = value` line each, in TOML syntax.
    /// Stable and line-oriented so scripts can read a value with `sed`/`grep`
    /// (`agent.run_dir = "/run/wazuh-agent"`). The proxy password is masked.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let q = |s: &str| toml_string(s);
        let p = |p: &Path| toml_string(&p.display().to_string());
        let list = |v: &[String]| format!("[{}]", v.iter().map(|s| toml_string(s)).collect::<Vec<_>>().join(", "));
        let d = |d: Duration| toml_string(&fmt_duration(d));
        let c = self;
        let lines: Vec<(&str, String)> = vec![
            ("agent.name", q(&c.agent.name)),
            ("agent.data_dir", p(&c.agent.data_dir)),
            ("agent.run_dir", p(&c.agent.run_dir)),
            ("agent.uuid_version", if c.agent.uuid_version == UuidVersion::V4 { "4" } else { "7" }.into()),
            ("agent.user", q(c.agent.user.as_deref().unwrap_or(""))),
            ("agent.group", q(c.agent.group.as_deref().unwrap_or(""))),
            ("server.url", list(&c.server.urls)),
            ("server.registration_url", q(&c.server.registration_url)),
            (
                "server.verify",
                q(match c.server.verify {
                    Verify::Full => "full",
                    Verify::Certificate => "certificate",
                    Verify::None => "none",
                }),
            ),
            ("server.ca_file", c.server.ca_file.as_deref().map(p).unwrap_or_else(|| q(""))),
            ("server.proxy", q(&c.server.proxy.as_deref().map(mask_userinfo).unwrap_or_default())),
            ("server.compression", q(if c.server.compression == Compression::Gzip { "gzip" } else { "none" })),
            ("server.request_timeout", d(c.server.request_timeout)),
            ("server.commands_timeout", d(c.server.commands_timeout)),
            ("events.batch_max_bytes", c.events.batch_max_bytes.to_string()),
            ("events.batch_max_events", c.events.batch_max_events.to_string()),
            ("events.batch_interval", d(c.events.batch_interval)),
            ("events.buffer_events", c.events.buffer_events.to_string()),
            ("events.overflow", q(if c.events.overflow == Overflow::Block { "block" } else { "drop_oldest" })),
            ("events.queue_max_bytes", c.events.queue_max_bytes.to_string()),
            ("retry.initial", d(c.retry.initial)),
            ("retry.max", d(c.retry.max)),
            ("logcollector.files", files_list(&c.logcollector.files)),
            ("logcollector.start", q(if c.logcollector.start == Start::End { "end" } else { "beginning" })),
            ("logcollector.max_line_bytes", c.logcollector.max_line_bytes.to_string()),
            ("logcollector.poll_interval", d(c.logcollector.poll_interval)),
            ("inventory.enabled", c.inventory.enabled.to_string()),
            ("inventory.interval", d(c.inventory.interval)),
            ("inventory.root", p(&c.inventory.root)),
            ("inventory.collectors", list(&c.inventory.collectors)),
            ("log.level", q(&c.log.level.to_string().to_lowercase())),
            ("log.file", c.log.file.as_deref().map(p).unwrap_or_else(|| q(""))),
            ("log.syslog", c.log.syslog.to_string()),
        ];
        for (k, v) in lines {
            let _ = writeln!(out, "{k} = {v}");
        }
        out
    }
}

/// `logcollector.files` as TOML: plain strings, or inline tables where a start was given.
fn files_list(files: &[FileSpec]) -> String {
    let items: Vec<String> = files
        .iter()
        .map(|f| match f.start {
            None => toml_string(&f.pattern),
            Some(s) => format!(
                "{{ path = {}, start = {} }}",
                toml_string(&f.pattern),
                toml_string(if s == Start::End { "end" } else { "beginning" })
            ),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// Formats a duration in the largest unit that represents it exactly.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `http://user:pass@host:3128` → `http://user:***@host:3128`.
fn mask_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    format!("{}{}:***{}", &url[..scheme_end], user, &rest[at..])
}

/// Best-effort name of the key at byte `offset` of a TOML document: the innermost
/// `[table]` header above it joined with the `key =` on that line. Used to name the key
/// in serde errors, which only carry a span.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[offset..].find('\n').map(|i| offset + i).unwrap_or(text.len());
    let line = text[line_start..line_end].trim();
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = if line.starts_with('[') {
        None
    } else {
        line.split('=').next().map(|k| k.trim().trim_matches('"').to_string()).filter(|k| !k.is_empty())
    };
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("accepted: {text}"))
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults();
        assert_eq!(c.server.urls, vec!["https://localhost:27000"]);
        assert_eq!(c.server.commands_timeout, Duration::from_secs(660));
        assert_eq!(c.events.batch_max_bytes, 1_000_000);
        assert_eq!(c.events.queue_max_bytes, 256_000_000);
        assert_eq!(c.agent.uuid_version, UuidVersion::V7);
        assert_eq!(c.inventory.collectors.len(), 5);
    }

    #[test]
    fn shipped_example_file_is_the_defaults() {
        let text = include_str!("../etc/wazuh-agent.toml");
        let parsed = parse(text).expect("etc/wazuh-agent.toml parses");
        assert_eq!(parsed.render(), Config::defaults().render());
    }

    #[test]
    fn durations() {
        let table: &[(&str, Option<u64>)] = &[
            ("250ms", Some(250)),
            ("10s", Some(10_000)),
            ("11m", Some(660_000)),
            ("1h", Some(3_600_000)),
            ("2d", Some(172_800_000)),
            (" 5s ", Some(5_000)),
            ("5", None),
            ("s", None),
            ("5x", None),
            ("-5s", None),
            ("1.5s", None),
            ("", None),
            ("99999999999999999999s", None),
        ];
        for (text, want) in table {
            let got = parse_duration(text).ok().map(|d| d.as_millis() as u64);
            assert_eq!(got, *want, "{text:?}");
        }
    }

    #[test]
    fn sizes() {
        let table: &[(&str, Option<u64>)] = &[
            ("1024", Some(1024)),
            ("64KiB", Some(65_536)),
            ("1MB", Some(1_000_000)),
            ("1MiB", Some(1_048_576)),
            ("256mb", Some(256_000_000)),
            ("2GiB", Some(2 << 30)),
            ("10 KB", Some(10_000)),
            ("KB", None),
            ("1XB", None),
            ("-1", None),
        ];
        for (text, want) in table {
            assert_eq!(parse_size(text).ok(), *want, "{text:?}");
        }
    }

    #[test]
    fn errors_name_their_key() {
        let cases: &[(&str, &str)] = &[
            ("[agent]\nfoo = 1\n", "agent.foo"),
            ("[server]\nverify = \"fulll\"\n", "server.verify"),
            ("[server]\nrequest_timeout = \"30\"\n", "server.request_timeout"),
            ("[server]\nrequest_timeout = 30\n", "server.request_timeout"),
            ("[server]\nurl = \"http://x\"\n", "server.url"),
            ("[server]\nurl = []\n", "server.url"),
            ("[server]\nproxy = \"socks5://h:1\"\n", "server.proxy"),
            ("[events]\nbatch_max_bytes = \"1XB\"\n", "events.batch_max_bytes"),
            ("[events]\nbatch_max_events = 0\n", "events.batch_max_events"),
            ("[events]\noverflow = \"drop\"\n", "events.overflow"),
            ("[retry]\ninitial = \"10s\"\nmax = \"1s\"\n", "retry.max"),
            ("[agent]\nuuid_version = 5\n", "agent.uuid_version"),
            ("[agent]\nname = \"bad name\"\n", "agent.name"),
            ("[agent]\ndata_dir = \"relative\"\n", "agent.data_dir"),
            ("[inventory]\ncollectors = [\"disks\"]\n", "inventory.collectors"),
            ("[log]\nlevel = \"loud\"\n", "log.level"),
            ("[nosuch]\nx = 1\n", "nosuch"),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert!(e.contains(&format!("`{key}`")), "{text:?} gave {e:?}, expected key {key}");
        }
    }

    #[test]
    fn url_list_and_trailing_slash() {
        let c = parse("[server]\nurl = [\"https://a:1/\", \"https://b:2\"]\n").unwrap();
        assert_eq!(c.server.urls, vec!["https://a:1", "https://b:2"]);
    }

    #[test]
    fn proxy_password_is_masked_and_never_echoed() {
        let c = parse("[server]\nproxy = \"http://u:s3cret@proxy:3128\"\n").unwrap();
        let r = c.render();
        assert!(r.contains("server.proxy = \"http://u:***@proxy:3128\""), "{r}");
        assert!(!r.contains("s3cret"));
        let e = err("[server]\nproxy = \"https://u:s3cret@proxy:3128\"\n");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn render_round_trips() {
        let c = parse("[agent]\nname = \"n1\"\n[events]\nbatch_interval = \"250ms\"\n").unwrap();
        let again = parse(&render_as_toml(&c.render())).unwrap();
        assert_eq!(c.render(), again.render());
    }

    /// Turns `a.b = v` lines back into TOML tables.
    fn render_as_toml(flat: &str) -> String {
        let mut out = String::new();
        let mut current = String::new();
        for line in flat.lines() {
            let (key, value) = line.split_once(" = ").unwrap();
            let (table, k) = key.split_once('.').unwrap();
            if table != current {
                out.push_str(&format!("[{table}]\n"));
                current = table.to_string();
            }
            out.push_str(&format!("{k} = {value}\n"));
        }
        out
    }

    #[test]
    fn overlays_apply_in_order_and_name_the_bad_file() {
        let local = "[events]\nbatch_interval = \"1s\"\n[log]\nlevel = \"warn\"\n";
        let overlay = |text: &str| -> toml::Table { toml::from_str(text).unwrap() };
        let c = Config::with_overlays(
            local,
            Some(Path::new("/etc/a.toml")),
            &[
                ("g1.yml".into(), overlay("[events]\nbatch_interval = \"5s\"\nbuffer_events = 500\n")),
                ("g2.yml".into(), overlay("[events]\nbatch_interval = \"250ms\"\n")),
            ],
        )
        .unwrap();
        assert_eq!(c.events.batch_interval, Duration::from_millis(250));
        assert_eq!(c.events.buffer_events, 500);
        assert_eq!(c.log.level, log::LevelFilter::Warn, "local keys not in a group stay");
        let base = parse(local).unwrap();
        assert_eq!(base.changed_keys(&c), vec!["events.batch_interval", "events.buffer_events"]);
        let e =
            Config::with_overlays(local, None, &[("bad.yml".into(), overlay("[events]\noverflow = \"explode\"\n"))])
                .unwrap_err()
                .to_string();
        assert!(e.contains("bad.yml") && e.contains("events.overflow"), "{e}");
    }

    #[test]
    fn logcollector_files_take_a_start_each() {
        let c = parse(
            "[logcollector]\nfiles = [\"/var/log/a.log\", { path = \"/var/log/*.json\", start = \"beginning\" }]\n",
        )
        .unwrap();
        assert_eq!(c.logcollector.files[0], FileSpec { pattern: "/var/log/a.log".into(), start: None });
        assert_eq!(c.logcollector.files[1].start, Some(Start::Beginning));
        let again = parse(&render_as_toml(&c.render())).unwrap();
        assert_eq!(again.logcollector.files, c.logcollector.files);
        for bad in [
            "[logcollector]\nfiles = [{ path = \"/x\", start = \"middle\" }]\n",
            "[logcollector]\nfiles = [\"relative.log\"]\n",
            "[logcollector]\nfiles = [{ path = \"/x\", other = 1 }]\n",
        ] {
            assert!(err(bad).contains("logcollector.files"), "{bad}: {}", err(bad));
        }
    }

    #[test]
    fn agent_names() {
        for ok in ["web-01", "a.b_c%d", "é", &"x".repeat(128)] {
            assert!(validate_agent_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "a:b", &"x".repeat(129)] {
            assert!(validate_agent_name(bad).is_err(), "{bad}");
        }
    }
}
