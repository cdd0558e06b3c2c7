//! Configuration: the TOML file (docs/configuration.md) parsed once into one immutable, typed [`Config`].
//! Every key is declared once, in [`KEYS`] (ARCHITECTURE.md, Seams): the file is read as a TOML table
//! and walked against it, each value turned into its typed field and the key named on failure.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the configuration is read from when neither `--config` nor the environment says.
pub const DEFAULT_PATH: &str = "/etc/wazuh-agent/wazuh-agent.toml";
/// Environment variable that overrides [`DEFAULT_PATH`] (the `--config` flag wins over it).
pub const ENV_CONFIG: &str = "WAZUH_AGENT_CONFIG";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named explicitly (flag or environment) could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML or has an unknown key.
    #[error("config file {}: {}{message}", path.display(), key.as_ref().map_or(String::new(), |k| format!("key `{k}`: ")))]
    Syntax { path: PathBuf, key: Option<String>, message: String },
    /// A key has a value the agent does not accept (wrong type, out of range, ...).
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    /// A server group file makes the configuration invalid.
    #[error("group file {file}: {message}")]
    Group { file: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), message: message.into() }
}

/// `choices! { TABLE: Type { Variant = "name", ... } ... }`: an enum and its names in the file,
/// in error-message order. Its `Default` (the first) is a placeholder: the key table sets every field.
macro_rules! choices {
    ($($(#[$doc:meta])* $table:ident: $ty:ident {
        $(#[$d0:meta])* $v0:ident = $n0:literal $(, $(#[$vdoc:meta])* $v:ident = $name:literal)* $(,)?
    })+) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub enum $ty {
            $(#[$d0])* #[default] $v0, $($(#[$vdoc])* $v),*
        }

        const $table: &[(&str, $ty)] = &[($n0, $ty::$v0), $(($name, $ty::$v)),*];
    )+};
}

choices! {
    /// UUID version the agent generates at registration.
    UUIDS: UuidVersion { V4 = "4", V7 = "7" }
    /// How the server's TLS certificate is checked.
    VERIFY: Verify {
        /// Chain to a trusted root and a name matching the URL's host.
        Full = "full",
        /// Chain to a trusted root; the host name is not checked (servers reached by IP).
        Certificate = "certificate",
        /// Nothing is checked. Loudly warned about at every start.
        None = "none",
    }
    /// Compression of request bodies.
    COMPRESSION: Compression { None = "none", Gzip = "gzip" }
    /// What happens when the stateless ring buffer is full.
    OVERFLOW: Overflow { DropOldest = "drop_oldest", Block = "block" }
    /// Where the logcollector starts in a file it has never seen.
    STARTS: Start { End = "end", Beginning = "beginning" }
}

/// One entry of `logcollector.files`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub pattern: String,
    /// Overrides `logcollector.start` for files this entry matches.
    pub start: Option<Start>,
}

/// Inventory collectors that can be switched on.
pub const COLLECTORS: &[&str] = &["system", "hardware", "packages", "networks", "ports", "processes"];

#[derive(Debug, Clone, Default)]
pub struct AgentConfig {
    /// Name to register with; empty means the host name.
    pub name: String,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub uuid_version: UuidVersion,
    /// Run as this user (and `group`) after start-up; `None`: stay as started.
    pub user: Option<String>,
    pub group: Option<String>,
    pub remote_config: bool,
}

#[derive(Debug, Clone, Default)]
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

#[derive(Debug, Clone, Default)]
pub struct EventsConfig {
    pub batch_max_bytes: u64,
    pub batch_max_events: usize,
    pub batch_interval: Duration,
    pub buffer_events: usize,
    pub buffer_bytes: u64,
    pub overflow: Overflow,
    pub queue_max_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct RetryConfig {
    pub initial: Duration,
    pub max: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct LogcollectorConfig {
    /// Paths or glob patterns, each with its own `start` if it was given one.
    pub files: Vec<FileSpec>,
    pub start: Start,
    /// Longer lines are cut here and tagged `truncated`.
    pub max_line_bytes: usize,
    /// How often followed files are checked for new lines, rotation and truncation.
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct InventoryConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub root: PathBuf,
    pub collectors: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct FimConfig {
    pub enabled: bool,
    pub paths: Vec<FimPath>,
    /// Glob patterns: one without `/` is matched against a name, one with `/` against the whole path.
    pub ignore: Vec<String>,
    pub interval: Duration,
    pub scan_on_start: bool,
    pub hashes: Vec<String>,
    pub max_file_bytes: u64,
    /// Bytes read for hashing per second at most; 0: no limit.
    pub max_read_rate: u64,
    pub max_files: usize,
    pub follow_symlinks: bool,
    pub max_eps: usize,
    pub root: PathBuf,
}

/// One entry of `fim.paths`: the levels of directories below it that are walked (0: its own entries only).
#[derive(Debug, Clone, PartialEq)]
pub struct FimPath {
    pub path: PathBuf,
    pub depth: usize,
    pub realtime: bool,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: log::LevelFilter,
    pub file: Option<PathBuf>,
    /// Also log to the system log (libc syslog, facility daemon).
    pub syslog: bool,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig { level: log::LevelFilter::Info, file: None, syslog: false }
    }
}

/// The whole, validated configuration. Built once, then passed by reference.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The file it was read from, if any (absent when the default path does not exist).
    pub source: Option<PathBuf>,
    pub agent: AgentConfig,
    pub server: ServerConfig,
    pub events: EventsConfig,
    pub retry: RetryConfig,
    pub logcollector: LogcollectorConfig,
    pub inventory: InventoryConfig,
    pub fim: FimConfig,
    pub log: LogConfig,
}

// The key table. Adding a key is one `key!` line here plus its field in the typed structs above.

/// One configuration key.
pub struct Key {
    pub section: &'static str,
    pub name: &'static str,
    /// The default, written as in the TOML file (`"1MB"`, `10000`, `[]`).
    pub default: &'static str,
    /// A server group file may set it (see docs/configuration.md); otherwise local only.
    pub server: bool,
    /// A change applies to the running agent; otherwise at the next start.
    pub live: bool,
    /// Checks a value and stores it in its field; the message does not repeat the key.
    pub parse: fn(&mut Config, &toml::Value) -> Result<(), String>,
    /// The effective value in TOML syntax, as `--check-config` prints it.
    pub render: fn(&Config) -> String,
    /// Copies the field from the second configuration into the first (live reload).
    pub copy: fn(&mut Config, &Config),
}

impl Key {
    /// `section.name`, as errors, `--check-config` and the documentation spell it.
    pub fn id(&self) -> String {
        format!("{}.{}", self.section, self.name)
    }
}

/// Looks a key up by section and name.
pub fn key(section: &str, name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.section == section && k.name == name)
}

const SERVER: bool = true;
const LOCAL: bool = false;
const LIVE: bool = true;
const RESTART: bool = false;

/// `key!(section.name = default, who, when, parse, render)`; `section.name(field)` when the field is named
/// differently. `parse` turns a TOML value into the field's type, `render` the field back into TOML text.
macro_rules! key {
    ($s:ident . $n:ident = $d:tt, $server:ident, $live:ident, $parse:expr, $render:expr) => {
        key!($s.$n($n) = $d, $server, $live, $parse, $render)
    };
    ($s:ident . $n:ident ($f:ident) = $d:tt, $server:ident, $live:ident, $parse:expr, $render:expr) => {
        Key {
            section: stringify!($s),
            name: stringify!($n),
            default: stringify!($d),
            server: $server,
            live: $live,
            parse: |c, v| ($parse)(v).map(|x| c.$s.$f = x),
            render: |c| ($render)(&c.$s.$f),
            copy: |to, from| to.$s.$f = Clone::clone(&from.$s.$f),
        }
    };
}

const SECOND: Duration = Duration::from_secs(1);
const MILLI: Duration = Duration::from_millis(1);

/// In `--check-config` order.
#[rustfmt::skip]
pub static KEYS: &[Key] = &[
    key!(agent.name = "", LOCAL, RESTART, agent_name, toml_string),
    key!(agent.data_dir = "/var/lib/wazuh-agent", LOCAL, RESTART, abs_dir, show_path),
    key!(agent.run_dir = "/run/wazuh-agent", LOCAL, RESTART, abs_dir, show_path),
    key!(agent.uuid_version = 7, LOCAL, RESTART, uuid_version, |u: &UuidVersion| show(UUIDS, u)),
    key!(agent.user = "", LOCAL, RESTART, account, show_maybe),
    key!(agent.group = "", LOCAL, RESTART, account, show_maybe),
    key!(agent.remote_config = true, LOCAL, LIVE, boolean, show_num),
    key!(server.url(urls) = "https://localhost:27000", LOCAL, RESTART, urls, show_list),
    key!(server.registration_url = "https://localhost:55000", LOCAL, RESTART,
        |v| validate_https_url(&string(v)?), toml_string),
    key!(server.verify = "full", LOCAL, RESTART, |v| choice(v, VERIFY), |x: &Verify| show(VERIFY, x)),
    key!(server.ca_file = "", LOCAL, RESTART, ca_file, show_maybe),
    key!(server.proxy = "", LOCAL, RESTART, proxy,
        |p: &Option<String>| toml_string(&p.as_deref().map(mask_userinfo).unwrap_or_default())),
    key!(server.compression = "none", LOCAL, RESTART, |v| choice(v, COMPRESSION),
        |x: &Compression| show(COMPRESSION, x)),
    key!(server.request_timeout = "30s", LOCAL, RESTART, |v| duration(v, SECOND), show_duration),
    key!(server.commands_timeout = "11m", LOCAL, RESTART, |v| duration(v, SECOND), show_duration),
    // Below 1 KiB not even the agent metadata line fits; above 64 MiB no server accepts it.
    key!(events.batch_max_bytes = "1MB", SERVER, LIVE, |v| size_in(v, 1 << 10, 64 << 20, "1KiB..=64MiB"), show_num),
    key!(events.batch_max_events = 10000, SERVER, LIVE, |v| count(v, 1, 1_000_000), show_num),
    key!(events.batch_interval = "1s", SERVER, LIVE, |v| duration(v, MILLI), show_duration),
    key!(events.buffer_events = 10000, SERVER, LIVE, |v| count(v, 1, 10_000_000), show_num),
    // Below 64 KiB batches could not fill; 1 GiB is far past any host this agent runs on.
    key!(events.buffer_bytes = "8MiB", SERVER, LIVE, |v| size_in(v, 64 << 10, 1 << 30, "64KiB..=1GiB"), show_num),
    key!(events.overflow = "drop_oldest", SERVER, LIVE, |v| choice(v, OVERFLOW), |x: &Overflow| show(OVERFLOW, x)),
    key!(events.queue_max_bytes = "256MB", LOCAL, RESTART, size, show_num),
    key!(retry.initial = "1s", SERVER, LIVE, |v| duration(v, 100 * MILLI), show_duration),
    key!(retry.max = "60s", SERVER, LIVE, |v| duration(v, MILLI), show_duration),
    key!(logcollector.files = [], SERVER, RESTART, files, show_files),
    key!(logcollector.start = "end", SERVER, RESTART, |v| choice(v, STARTS), |x: &Start| show(STARTS, x)),
    // A line must fit an event line of the ingest format (1 MiB) with its JSON around it.
    key!(logcollector.max_line_bytes = "64KiB", SERVER, RESTART,
        |v| size_in(v, 256, 512 << 10, "256..=512KiB").map(|n| n as usize), show_num),
    key!(logcollector.poll_interval = "1s", SERVER, RESTART, |v| duration(v, 50 * MILLI), show_duration),
    key!(inventory.enabled = true, SERVER, RESTART, boolean, show_num),
    key!(inventory.interval = "1h", SERVER, RESTART, |v| duration(v, SECOND), show_duration),
    key!(inventory.root = "/", LOCAL, RESTART, abs_dir, show_path),
    key!(inventory.collectors = ["system", "hardware", "packages", "networks", "ports"], SERVER, RESTART,
        collectors, show_list),
    key!(fim.enabled = false, SERVER, RESTART, boolean, show_num),
    key!(fim.paths = [], SERVER, RESTART, fim_paths, show_fim_paths),
    key!(fim.ignore = [], SERVER, RESTART, globs, show_list),
    key!(fim.interval = "12h", SERVER, RESTART, |v| duration(v, SECOND), show_duration),
    key!(fim.scan_on_start = true, SERVER, RESTART, boolean, show_num),
    key!(fim.hashes = ["sha256"], SERVER, RESTART, |v| subset(v, &["md5", "sha1", "sha256"]), show_list),
    key!(fim.max_file_bytes = "64MiB", SERVER, RESTART, size, show_num),
    key!(fim.max_read_rate = "50MiB", SERVER, RESTART, read_rate, show_num),
    key!(fim.max_files = 100000, SERVER, RESTART, |v| count(v, 1, 10_000_000), show_num),
    key!(fim.follow_symlinks = false, SERVER, RESTART, boolean, show_num),
    key!(fim.max_eps = 200, SERVER, RESTART, |v| count(v, 1, 1_000_000), show_num),
    key!(fim.root = "/", LOCAL, RESTART, abs_dir, show_path),
    key!(log.level = "info", SERVER, LIVE, |v| choice(v, LEVELS), |x: &log::LevelFilter| show(LEVELS, x)),
    key!(log.file = "", LOCAL, RESTART, maybe_path, show_maybe),
    key!(log.syslog = false, LOCAL, RESTART, boolean, show_num),
];

/// Values that need a part a build may leave out: key, whether the value needs it, part, cargo feature, built in.
#[allow(clippy::type_complexity)] // a table: one line per entry reads better than a struct
#[rustfmt::skip]
const NEEDS: [(&str, fn(&Config) -> bool, &str, &str, bool); 5] = [
    ("logcollector.files", |c| !c.logcollector.files.is_empty(), "logcollector", "logcollector", cfg!(feature = "logcollector")),
    ("inventory.enabled", |c| c.inventory.enabled, "inventory", "inventory", cfg!(feature = "inventory")),
    ("fim.enabled", |c| c.fim.enabled, "file integrity monitoring", "fim", cfg!(feature = "fim")),
    ("server.compression", |c| c.server.compression == Compression::Gzip, "gzip", "gzip", cfg!(feature = "gzip")),
    ("server.ca_file", |c| c.server.ca_file.is_none(), "built-in roots", "webpki-roots", cfg!(feature = "webpki-roots")),
];

const LEVELS: &[(&str, log::LevelFilter)] = &[
    ("error", log::LevelFilter::Error),
    ("warn", log::LevelFilter::Warn),
    ("info", log::LevelFilter::Info),
    ("debug", log::LevelFilter::Debug),
    ("trace", log::LevelFilter::Trace),
];

// Value parsers (pure): a TOML value in, the typed value or a message out.

fn expected(what: &str, v: &toml::Value) -> String {
    format!("expected {what}, found {}", v.type_str())
}

fn string(v: &toml::Value) -> Result<String, String> {
    v.as_str().map(str::to_string).ok_or_else(|| expected("a string", v))
}

fn boolean(v: &toml::Value) -> Result<bool, String> {
    v.as_bool().ok_or_else(|| expected("true or false", v))
}

fn strings(v: &toml::Value) -> Result<Vec<String>, String> {
    let items = v.as_array().ok_or_else(|| expected("a list of strings", v))?;
    items.iter().map(string).collect()
}

fn count(v: &toml::Value, min: i64, max: i64) -> Result<usize, String> {
    let n = v.as_integer().ok_or_else(|| expected("an integer", v))?;
    (min..=max).contains(&n).then_some(n as usize).ok_or_else(|| format!("{n} is outside {min}..={max}"))
}

fn size(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
        toml::Value::String(t) => parse_size(t),
        _ => Err(expected("a size", v)),
    }
}

/// `fim.max_read_rate`: 0 (no limit) or at least 64 KiB a second, so a throttled read of one 64 KiB buffer waits
/// at most a second.
fn read_rate(v: &toml::Value) -> Result<u64, String> {
    let n = size(v)?;
    (n == 0 || n >= 64 << 10).then_some(n).ok_or_else(|| format!("{n} is below 64KiB a second (0: no limit)"))
}

fn size_in(v: &toml::Value, min: u64, max: u64, range: &str) -> Result<u64, String> {
    let n = size(v)?;
    (min..=max).contains(&n).then_some(n).ok_or_else(|| format!("{n} is outside {range}"))
}

fn duration(v: &toml::Value, min: Duration) -> Result<Duration, String> {
    let text = string(v)?;
    let d = parse_duration(&text)?;
    (d >= min).then_some(d).ok_or_else(|| format!("{text:?} is below the minimum of {}", fmt_duration(min)))
}

fn choice<T: Copy>(v: &toml::Value, options: &[(&str, T)]) -> Result<T, String> {
    let text = if let toml::Value::Integer(n) = v { n.to_string() } else { string(v)? };
    options.iter().find(|(name, _)| *name == text).map(|(_, v)| *v).ok_or_else(|| {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        format!("{text:?} is not one of {}", names.join(" | "))
    })
}

fn uuid_version(v: &toml::Value) -> Result<UuidVersion, String> {
    v.as_integer().ok_or_else(|| expected("4 or 7", v)).and_then(|_| choice(v, UUIDS))
}

fn agent_name(v: &toml::Value) -> Result<String, String> {
    let name = string(v)?;
    if name.is_empty() { Ok(name) } else { validate_agent_name(&name).map(|()| name) }
}

fn abs_dir(v: &toml::Value) -> Result<PathBuf, String> {
    match PathBuf::from(string(v)?) {
        p if p.as_os_str().is_empty() => Err("must not be empty".into()),
        p if !p.is_absolute() => Err(format!("{} is not an absolute path", p.display())),
        p => Ok(p),
    }
}

/// An empty string means "none".
fn maybe_path(v: &toml::Value) -> Result<Option<PathBuf>, String> {
    Ok(Some(string(v)?).filter(|s| !s.is_empty()).map(PathBuf::from))
}

/// Checked at load, so the unit's pre-start check (`--check-config`) catches a missing file.
/// Permission denied passes: a reload as `agent.user` cannot read a root-only file root read.
fn ca_file(v: &toml::Value) -> Result<Option<PathBuf>, String> {
    let path = maybe_path(v)?;
    match path.as_deref().map(|p| (p.display(), std::fs::read(p))) {
        Some((p, Err(e))) if e.kind() != std::io::ErrorKind::PermissionDenied => {
            Err(format!("cannot read {p}: {e}; give the server CA's PEM file, or \"\" for the system's roots"))
        }
        _ => Ok(path),
    }
}

fn account(v: &toml::Value) -> Result<Option<String>, String> {
    let name = string(v)?;
    if name.starts_with('-') || name.chars().any(|c| c.is_whitespace() || c == ':' || c == '/') {
        return Err(format!("{name:?} is not a valid account name"));
    }
    Ok(Some(name).filter(|n| !n.is_empty()))
}

fn urls(v: &toml::Value) -> Result<Vec<String>, String> {
    let urls = if v.is_array() { strings(v)? } else { vec![string(v)?] };
    if urls.is_empty() {
        return Err("the list is empty; give at least one https:// URL".into());
    }
    urls.iter().map(|u| validate_https_url(u)).collect()
}

fn proxy(v: &toml::Value) -> Result<Option<String>, String> {
    let text = string(v)?;
    if text.is_empty() {
        return Ok(None);
    }
    // Never echo the text back: it may carry a password.
    if !text.starts_with("http://") {
        return Err("must be http://[user:pass@]host:port (HTTP CONNECT proxy)".into());
    }
    ureq::Proxy::new(&text).map_err(|e| format!("is not a valid proxy URL: {e}"))?;
    if !text.parse::<ureq::http::Uri>().is_ok_and(|u| u.authority().is_some_and(port_ok)) {
        return Err("has an invalid port; give one in 1..=65535".into());
    }
    Ok(Some(text))
}

fn files(v: &toml::Value) -> Result<Vec<FileSpec>, String> {
    let items = v.as_array().ok_or_else(|| expected("a list", v))?;
    let mut files = Vec::with_capacity(items.len());
    for item in items {
        let (pattern, start) = match item {
            toml::Value::Table(t) => {
                if let Some(other) = t.keys().find(|k| !matches!(k.as_str(), "path" | "start")) {
                    return Err(format!("an entry has an unknown field {other:?} (path, start)"));
                }
                let path = t.get("path").ok_or("an entry has no path")?;
                let start = t.get("start").map(|s| choice(s, STARTS)).transpose();
                (string(path)?, start.map_err(|m| format!("start: {m}"))?)
            }
            _ => (string(item)?, None),
        };
        let checks = [
            (!pattern.trim().is_empty(), "is an empty path"),
            (pattern.starts_with('/'), "is not an absolute path"),
            (glob::Pattern::new(&pattern).is_ok(), "is not a valid glob pattern"),
        ];
        checks.iter().find(|(ok, _)| !ok).map_or(Ok(()), |(_, problem)| Err(format!("{pattern:?} {problem}")))?;
        files.push(FileSpec { pattern, start });
    }
    Ok(files)
}

fn collectors(v: &toml::Value) -> Result<Vec<String>, String> {
    subset(v, COLLECTORS)
}

/// Names out of `options`, each at most once.
fn subset(v: &toml::Value, options: &[&str]) -> Result<Vec<String>, String> {
    let collectors = strings(v)?;
    let problem = collectors.iter().enumerate().find_map(|(i, c)| match c {
        _ if !options.contains(&c.as_str()) => Some(format!("{c:?} is not one of {}", options.join(", "))),
        _ if collectors[..i].contains(c) => Some(format!("{c:?} is listed twice")),
        _ => None,
    });
    problem.map_or(Ok(collectors), Err)
}

fn globs(v: &toml::Value) -> Result<Vec<String>, String> {
    let bad = |p: &&String| glob::Pattern::new(p).is_err();
    strings(v)
        .and_then(|g| g.iter().find(bad).map_or(Ok(g.clone()), |p| Err(format!("{p:?} is not a valid glob pattern"))))
}

/// `fim.paths`: absolute paths, or tables `{ path, recursive = true | false | 0..=256, realtime = false }`.
fn fim_paths(v: &toml::Value) -> Result<Vec<FimPath>, String> {
    let entry = |item: &toml::Value| {
        let Some(t) = item.as_table() else {
            return Ok(FimPath { path: string(item)?.into(), depth: 256, realtime: false });
        };
        if let Some(other) = t.keys().find(|k| !matches!(k.as_str(), "path" | "recursive" | "realtime")) {
            return Err(format!("an entry has an unknown field {other:?} (path, recursive, realtime)"));
        }
        let depth = match t.get("recursive") {
            None | Some(toml::Value::Boolean(true)) => Ok(256),
            Some(toml::Value::Boolean(false)) => Ok(0),
            Some(d) => count(d, 0, 256).map_err(|m| format!("recursive: {m}")),
        };
        let realtime = t.get("realtime").map_or(Ok(false), boolean).map_err(|m| format!("realtime: {m}"))?;
        Ok(FimPath { path: string(t.get("path").ok_or("an entry has no path")?)?.into(), depth: depth?, realtime })
    };
    let paths = v.as_array().ok_or_else(|| expected("a list", v))?.iter().map(entry).collect::<Result<Vec<_>, _>>()?;
    let bad = |p: &&FimPath| !p.path.is_absolute() || p.path.components().any(|c| c == std::path::Component::ParentDir);
    paths
        .iter()
        .find(bad)
        .map_or(Ok(paths.clone()), |p| Err(format!("{:?} is not an absolute path without ..", p.path)))
}

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

/// Duration units in milliseconds, largest first.
const DURATION_UNITS: [(&str, u64); 5] = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// Parses `"250ms"`, `"10s"`, `"11m"`, `"1h"`, `"2d"`; a bare number is refused (`30`: milliseconds or minutes?).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (n, unit) = split_number(text, "a duration (examples: \"250ms\", \"10s\", \"11m\", \"1h\")")?;
    let Some((_, ms_per_unit)) = DURATION_UNITS.iter().find(|(u, _)| *u == unit) else {
        let why = if unit.is_empty() { "needs a unit".to_string() } else { format!("has an unknown unit {unit:?}") };
        return Err(format!("{text:?} {why} (ms, s, m, h or d)"));
    };
    n.checked_mul(*ms_per_unit).map(Duration::from_millis).ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a size: bytes, or a string such as `"64KiB"` (KiB/MiB/GiB: powers of 1024) or `"1MB"` (of 1000).
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
        other => return Err(format!("{text:?} has an unknown unit {other:?} (B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{text:?} is too large"))
}

/// Checks an agent name against the server's rule `^[\w\-.%]+$`, at most 128 characters.
pub fn validate_agent_name(name: &str) -> Result<(), String> {
    let n = name.chars().count();
    match name.chars().find(|c| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '%'))) {
        _ if name.is_empty() => Err("the name is empty".into()),
        _ if n > 128 => Err(format!("the name is {n} characters long; at most 128 are allowed")),
        Some(c) => {
            Err(format!("the name {name:?} contains {c:?}; only letters, digits, '_', '-', '.' and '%' are allowed"))
        }
        None => Ok(()),
    }
}

/// Validates a base URL: `https://host[:port][/prefix]`, returned without a trailing slash.
pub fn validate_https_url(text: &str) -> Result<String, String> {
    // Checked first and never echoed: the text would carry a password.
    if text.contains('@') {
        return Err("must not carry credentials (user:password@); give the URL without them".into());
    }
    let uri: ureq::http::Uri = text.parse().map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    let checks = [
        (uri.scheme_str() == Some("https"), "must start with https:// (the agent only speaks TLS)"),
        (uri.authority().is_some_and(|a| !a.host().is_empty()), "has no host"),
        (uri.query().is_none(), "must not have a query"),
        (uri.authority().is_some_and(port_ok), "has an invalid port; give one in 1..=65535"),
    ];
    checks
        .iter()
        .find(|(ok, _)| !ok)
        .map_or(Ok(text.trim_end_matches('/').to_string()), |(_, p)| Err(format!("{text:?} {p}")))
}

/// A port after the host, if any, is 1..=65535 in digits only (`u16` parsing also takes `+80`).
fn port_ok(a: &ureq::http::uri::Authority) -> bool {
    let host_port = a.as_str().rsplit_once('@').map_or(a.as_str(), |(_, h)| h);
    host_port == a.host() || a.port().is_some_and(|p| p.as_u16() > 0 && p.as_str().bytes().all(|b| b.is_ascii_digit()))
}

impl Config {
    /// The configuration with every key at its default (as if the file were empty).
    pub fn defaults() -> Config {
        // Valid by construction; the unit test `defaults_are_valid` holds this to account.
        Config::from_table(&toml::Table::new(), None)
            .unwrap_or_else(|e| unreachable!("built-in defaults are invalid: {e}"))
    }

    /// Parses TOML text. `path` is only used in messages and recorded as the source.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::from_table(&toml_table(text, path)?, Some(path))
    }

    /// Loads the configuration: `explicit` (`--config`), else `WAZUH_AGENT_CONFIG`, else [`DEFAULT_PATH`].
    /// A file named explicitly (flag or variable) must exist; a missing default file means all defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os(ENV_CONFIG).filter(|v| !v.is_empty()).map(PathBuf::from);
        let named = explicit.map(Path::to_path_buf).or(from_env);
        let required = named.is_some();
        let path = named.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(Config::defaults()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// The local file (`text`, known valid) with `overlays` (`(file name, section → key → value)`) applied in
    /// order, validated after each, so an error names the group file at fault.
    pub fn with_overlays(
        text: &str,
        source: Option<&Path>,
        overlays: &[(String, toml::Table)],
    ) -> Result<Config, ConfigError> {
        let mut table = toml_table(text, source.unwrap_or(Path::new("")))?;
        let mut config = Config::from_table(&table, source)?;
        let overlays = if config.agent.remote_config { overlays } else { &[] };
        for (file, overlay) in overlays {
            for (section, values) in overlay {
                let entry = table.entry(section.clone()).or_insert_with(|| toml::Table::new().into());
                if let (toml::Value::Table(t), toml::Value::Table(values)) = (entry, values) {
                    t.extend(values.clone());
                }
            }
            config = Config::from_table(&table, source)
                .and_then(|c| c.check_build().map(|()| c))
                .map_err(|e| ConfigError::Group { file: file.clone(), message: e.to_string() })?;
        }
        Ok(config)
    }

    /// Refuses a value that needs a part this build lacks ([`NEEDS`]); not in parsing, so every build reads every file.
    pub fn check_build(&self) -> Result<(), ConfigError> {
        let lacking = NEEDS.iter().find(|(_, needs, .., built)| !built && needs(self));
        lacking.map_or(Ok(()), |(key, _, part, f, _)| {
            Err(invalid(key, format!("this build has no {part} (cargo feature \"{f}\")")))
        })
    }

    /// The effective values, one `section.key = value` line each in TOML syntax, stable for `sed`/`grep`
    /// (`agent.run_dir = "/run/wazuh-agent"`). The proxy password is masked.
    pub fn render(&self) -> String {
        KEYS.iter().map(|k| format!("{} = {}\n", k.id(), (k.render)(self))).collect()
    }

    /// Walks `table` against [`KEYS`]: unknown keys are refused, missing keys take their
    /// default, then the checks that involve more than one key.
    fn from_table(table: &toml::Table, source: Option<&Path>) -> Result<Config, ConfigError> {
        let path = source.map(Path::to_path_buf).unwrap_or_default();
        let unknown = |key, message| ConfigError::Syntax { path: path.clone(), key: Some(key), message };
        for (section, values) in table {
            if !KEYS.iter().any(|k| k.section == section) {
                return Err(unknown(section.clone(), "is not a configuration section".into()));
            }
            let toml::Value::Table(values) = values else {
                let fix = format!("write it as one [{section}] table, not [[{section}]]");
                let message = if values.is_array() { fix } else { expected("a [section]", values) };
                return Err(unknown(section.clone(), message));
            };
            if let Some(name) = values.keys().find(|name| key(section, name).is_none()) {
                let known: Vec<&str> = KEYS.iter().filter(|k| k.section == section).map(|k| k.name).collect();
                let message = format!("is not a configuration key (those of [{section}]: {})", known.join(", "));
                return Err(unknown(format!("{section}.{name}"), message));
            }
        }
        // Placeholders (`Default`) for every field: the loop below sets each one from its key.
        let mut c = Config { source: source.map(Path::to_path_buf), ..Config::default() };
        for k in KEYS {
            let default = || k.default.parse::<toml::Value>().map_err(|e| format!("bad default: {e}"));
            let given = table.get(k.section).and_then(|s| s.get(k.name)).cloned();
            given.map_or_else(default, Ok).and_then(|v| (k.parse)(&mut c, &v)).map_err(|m| invalid(&k.id(), m))?;
        }
        let (b, q) = (c.events.batch_max_bytes, c.events.queue_max_bytes);
        let (max, initial) = (fmt_duration(c.retry.max), fmt_duration(c.retry.initial));
        let checks = [
            (c.agent.group.is_none() || c.agent.user.is_some(), "agent.group", "needs agent.user".to_string()),
            (q >= b, "events.queue_max_bytes", format!("{q} is smaller than events.batch_max_bytes ({b})")),
            (c.retry.max >= c.retry.initial, "retry.max", format!("{max} is smaller than retry.initial ({initial})")),
        ];
        checks.into_iter().find(|(ok, ..)| !ok).map_or(Ok(c), |(_, key, message)| Err(invalid(key, message)))
    }
}

/// Parses TOML text into a table; a syntax error names the key nearest to it.
fn toml_table(text: &str, path: &Path) -> Result<toml::Table, ConfigError> {
    text.parse().map_err(|e: toml::de::Error| {
        let key = e.span().and_then(|span| key_at(text, span.start));
        ConfigError::Syntax { path: path.to_path_buf(), key, message: e.message().trim().to_string() }
    })
}

// Renderers: a typed value back into TOML text.

fn show_num(n: &impl fmt::Display) -> String {
    n.to_string()
}

fn show_path(p: &Path) -> String {
    toml_string(&p.display().to_string())
}

/// A path or name that is not set is `""`.
fn show_maybe<T: AsRef<Path>>(p: &Option<T>) -> String {
    p.as_ref().map_or_else(|| toml_string(""), |p| show_path(p.as_ref()))
}

fn show_list(v: &[String]) -> String {
    format!("[{}]", v.iter().map(|s| toml_string(s)).collect::<Vec<_>>().join(", "))
}

fn show_duration(d: &Duration) -> String {
    toml_string(&fmt_duration(*d))
}

/// The name of a choice; numbers (`agent.uuid_version`) stay bare.
fn show<T: PartialEq>(options: &[(&str, T)], x: &T) -> String {
    let name = options.iter().find(|(_, v)| v == x).map_or("", |(n, _)| n);
    if name.parse::<i64>().is_ok() { name.to_string() } else { toml_string(name) }
}

/// `logcollector.files` as TOML: plain strings, or inline tables where a start was given.
fn show_files(files: &[FileSpec]) -> String {
    let item = |f: &FileSpec| match f.start {
        None => toml_string(&f.pattern),
        Some(s) => format!("{{ path = {}, start = {} }}", toml_string(&f.pattern), show(STARTS, &s)),
    };
    format!("[{}]", files.iter().map(item).collect::<Vec<_>>().join(", "))
}

fn show_fim_paths(paths: &[FimPath]) -> String {
    let item = |p: &FimPath| match (p.depth, p.realtime) {
        (256, false) => show_path(&p.path),
        (d, r) => format!("{{ path = {}, recursive = {d}, realtime = {r} }}", show_path(&p.path)),
    };
    format!("[{}]", paths.iter().map(item).collect::<Vec<_>>().join(", "))
}

/// Formats a duration in the largest unit that represents it exactly.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let (unit, size) =
        DURATION_UNITS.iter().find(|(_, n)| ms >= *n as u128 && ms % *n as u128 == 0).unwrap_or(&("ms", 1));
    format!("{}{unit}", ms / *size as u128)
}

fn toml_string(s: &str) -> String {
    let escape = |c: char| match c {
        '"' | '\\' => format!("\\{c}"),
        c if c.is_control() => format!("\\u{:04X}", c as u32),
        c => c.to_string(),
    };
    format!("\"{}\"", s.chars().map(escape).collect::<String>())
}

/// `http://user:pass@host:3128` → `http://user:***@host:3128`.
fn mask_userinfo(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.split_once('@')?))) {
        Some((scheme, (user, host))) => format!("{scheme}://{}:***@{host}", user.split(':').next().unwrap_or("")),
        None => url.to_string(),
    }
}

/// Best-effort name of the key at byte `offset` of a TOML document (a syntax error only carries a span):
/// the innermost `[table]` header above it joined with the `key =` on that line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[offset..].find('\n').map(|i| offset + i).unwrap_or(text.len());
    let line = text[line_start..line_end].trim();
    let header = |l: &&str| l.starts_with('[') && !l.starts_with("[[");
    let table = before[..line_start].lines().rev().map(str::trim).find(header);
    let table = table.map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = Some(line).filter(|l| !l.starts_with('[')).and_then(|l| l.split('=').next());
    let key = key.map(|k| k.trim().trim_matches('"').to_string()).filter(|k| !k.is_empty());
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (t, k) => k.or(t),
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
    fn every_key_parses_its_default_and_renders_it_back() {
        for k in KEYS {
            let mut c = Config::defaults();
            let default: toml::Value = k.default.parse().unwrap();
            (k.parse)(&mut c, &default).unwrap_or_else(|e| panic!("{}: {e}", k.id()));
            let rendered: toml::Value = (k.render)(&c).parse().unwrap();
            (k.parse)(&mut c, &rendered).unwrap_or_else(|e| panic!("{}: {e}", k.id()));
            assert_eq!((k.render)(&c), (k.render)(&Config::defaults()), "{}", k.id());
        }
    }

    #[test]
    fn every_key_names_itself_in_its_errors() {
        for k in KEYS {
            let e = err(&format!("[{}]\n{} = 1979-05-27T07:32:00Z\n", k.section, k.name));
            assert!(e.contains(&format!("`{}`", k.id())), "{e}");
            assert_eq!(key(k.section, k.name).map(Key::id), Some(k.id()));
        }
    }

    #[test]
    fn who_may_set_what_and_when_it_applies() {
        let ids = |f: fn(&Key) -> bool| KEYS.iter().filter(|k| f(k)).map(Key::id).collect::<Vec<_>>().join(" ");
        assert_eq!(
            ids(|k| k.server),
            "events.batch_max_bytes events.batch_max_events events.batch_interval events.buffer_events \
             events.buffer_bytes events.overflow retry.initial retry.max logcollector.files logcollector.start \
             logcollector.max_line_bytes logcollector.poll_interval inventory.enabled inventory.interval \
             inventory.collectors fim.enabled fim.paths fim.ignore fim.interval fim.scan_on_start fim.hashes \
             fim.max_file_bytes fim.max_read_rate fim.max_files fim.follow_symlinks fim.max_eps log.level"
        );
        assert_eq!(
            ids(|k| k.live),
            "agent.remote_config events.batch_max_bytes events.batch_max_events events.batch_interval \
             events.buffer_events events.buffer_bytes events.overflow retry.initial retry.max log.level"
        );
    }

    /// `section.key` names of a TOML document, sorted.
    fn keys_of(text: &str) -> Vec<String> {
        let table: toml::Table = text.parse().unwrap();
        let mut keys: Vec<String> =
            table.iter().flat_map(|(s, t)| t.as_table().unwrap().keys().map(move |k| format!("{s}.{k}"))).collect();
        keys.sort();
        keys
    }

    #[test]
    fn the_shipped_file_lists_every_key_once() {
        let mut want: Vec<String> = KEYS.iter().map(Key::id).collect();
        want.sort();
        assert_eq!(keys_of(include_str!("../etc/wazuh-agent.toml")), want);
    }

    /// docs/configuration.md has one `### `key`` entry per key, in table order, each
    /// followed by the line this test expects (printed when it differs).
    #[test]
    fn the_reference_documents_every_key() {
        let doc = include_str!("../docs/configuration.md");
        let mut lines = doc.lines().filter(|l| !l.trim().is_empty());
        let mut documented = Vec::new();
        while let Some(line) = lines.next() {
            let Some(id) = line.strip_prefix("### `").and_then(|l| l.strip_suffix('`')) else { continue };
            let k = KEYS.iter().find(|k| k.id() == id).unwrap_or_else(|| panic!("{id} is not a key"));
            let facts = format!(
                "Default `{}`. {}. {}.",
                k.default,
                if k.live { "Applies live" } else { "Applies at the next start" },
                if k.server { "The server may set it" } else { "Local only" }
            );
            assert_eq!(lines.next(), Some(facts.as_str()), "docs/configuration.md, {id}");
            documented.push(id.to_string());
        }
        assert_eq!(documented, KEYS.iter().map(Key::id).collect::<Vec<_>>());
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
            ("[retry]\ninitial = \"10ms\"\n", "retry.initial"),
            ("[agent]\nuuid_version = 5\n", "agent.uuid_version"),
            ("[agent]\nname = \"bad name\"\n", "agent.name"),
            ("[agent]\ndata_dir = \"relative\"\n", "agent.data_dir"),
            ("[inventory]\ncollectors = [\"disks\"]\n", "inventory.collectors"),
            ("[log]\nlevel = \"loud\"\n", "log.level"),
            ("[nosuch]\nx = 1\n", "nosuch"),
            ("[[events]]\nbatch_interval = \"1s\"\n", "events"),
            ("[server]\nurl = \"https://m:99999\"\n", "server.url"),
            ("[server]\nurl = [\"https://a:1\", \"https://b:0/x\"]\n", "server.url"),
            ("[server]\nregistration_url = \"https://m:65536\"\n", "server.registration_url"),
            ("[server]\nca_file = \"/nonexistent/ca.pem\"\n", "server.ca_file"),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert!(e.contains(&format!("`{key}`")), "{text:?} gave {e:?}, expected key {key}");
        }
    }

    #[test]
    fn messages_say_the_fix() {
        let cases: &[(&str, &str)] = &[
            ("[[events]]\n", "write it as one [events] table, not [[events]]"),
            ("events = 5\n", "expected a [section], found integer"),
            ("[server]\nurl = \"https://m:99999\"\n", "invalid port; give one in 1..=65535"),
            ("[server]\nurl = \"https://m:+80\"\n", "invalid port; give one in 1..=65535"),
            ("[server]\nproxy = \"http://u:pw@p:99999\"\n", "invalid port; give one in 1..=65535"),
            ("[server]\nproxy = \"http://p:+80\"\n", "invalid port; give one in 1..=65535"),
            ("[server]\nurl = \"https://u:pw@m:1\"\n", "must not carry credentials (user:password@)"),
            ("[server]\nca_file = \"/nonexistent/ca.pem\"\n", "cannot read /nonexistent/ca.pem: "),
            ("[server]\nca_file = \"/\"\n", "or \"\" for the system's roots"),
        ];
        for (text, message) in cases {
            let e = err(text);
            assert!(e.contains(message), "{text:?} gave {e:?}");
        }
        let ca = tempfile::NamedTempFile::new().unwrap();
        let text = format!("[server]\nurl = [\"https://[::1]\", \"https://h:65535/p\"]\nca_file = {:?}\n", ca.path());
        assert_eq!(parse(&text).unwrap().server.ca_file.as_deref(), Some(ca.path()));
    }

    #[test]
    fn a_value_that_needs_a_part_left_out_of_the_build_is_refused_naming_key_and_feature() {
        let ca = tempfile::NamedTempFile::new().unwrap();
        let ca_line = format!("ca_file = {:?}\n", ca.path());
        let off = "[inventory]\nenabled = false\n";
        assert!(parse(&format!("[server]\n{ca_line}{off}")).unwrap().check_build().is_ok(), "every build runs this");
        // Per entry of NEEDS, in order: the [server] lines, the other sections, whether the feature is built in.
        let cases = [
            (
                ca_line.clone(),
                format!("{off}[logcollector]\nfiles = [\"/var/log/syslog\"]\n"),
                cfg!(feature = "logcollector"),
            ),
            (ca_line.clone(), "[inventory]\nenabled = true\n".into(), cfg!(feature = "inventory")),
            (ca_line.clone(), format!("{off}[fim]\nenabled = true\n"), cfg!(feature = "fim")),
            (format!("{ca_line}compression = \"gzip\"\n"), off.into(), cfg!(feature = "gzip")),
            ("ca_file = \"\"\n".into(), off.into(), cfg!(feature = "webpki-roots")),
        ];
        for ((key, .., feature, _), (server, rest, built)) in NEEDS.iter().zip(cases) {
            let got = parse(&format!("[server]\n{server}{rest}")).unwrap().check_build().map_err(|e| e.to_string());
            match (built, got) {
                (true, got) => assert!(got.is_ok(), "{key}: {got:?}"),
                (false, Ok(())) => panic!("{key} is accepted without the feature {feature}"),
                (false, Err(e)) => {
                    assert!(e.contains(&format!("`{key}`: this build has no ")), "{e}");
                    assert!(e.contains(&format!("(cargo feature \"{feature}\")")), "{e}");
                }
            }
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
    #[cfg_attr(not(feature = "default"), ignore = "its local file is the default build's (inventory, built-in roots)")]
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
        let changed: Vec<String> = KEYS.iter().filter(|k| (k.render)(&base) != (k.render)(&c)).map(Key::id).collect();
        assert_eq!(changed, vec!["events.batch_interval", "events.buffer_events"]);
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
