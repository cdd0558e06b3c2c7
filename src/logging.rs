//! Logging: simplelog to standard error or `log.file` (RFC 3339 UTC timestamps, thread names),
//! optionally also to the system log. The file is reopened on SIGHUP (logrotate moves it away).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use log::{LevelFilter, Log, Metadata, Record};
use simplelog::{ConfigBuilder, WriteLogger};

use crate::config::Config;

/// `log.file` could not be opened for appending.
#[derive(Debug, thiserror::Error)]
#[error("cannot open log.file {}: {source}", path.display())]
pub struct LogError {
    path: PathBuf,
    source: io::Error,
}

/// Set once logging goes to `log.file`, so fatal errors are recorded there too.
static FILE: OnceLock<(PathBuf, Arc<Mutex<File>>)> = OnceLock::new();

fn open(path: &Path, user: Option<&str>) -> io::Result<File> {
    crate::fsutil::open_owned(OpenOptions::new().create(true).append(true), path, user)
}

/// A file that can be swapped for a newly opened one under the same path.
struct Reopenable(Arc<Mutex<File>>);

impl Write for Reopenable {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The logger serialises writes anyway; this lock only excludes a concurrent reopen.
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// SIGHUP: reopen `log.file` (after logrotate renamed it). No-op when logging to stderr.
pub fn reopen() -> io::Result<()> {
    if let Some((path, file)) = FILE.get() {
        let fresh = open(path, None)?;
        *file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
    }
    Ok(())
}

/// The log file, if any: handed to `agent.user` before privileges are dropped; `main` logs its fatal error there too.
pub fn file_path() -> Option<&'static Path> {
    FILE.get().map(|(p, _)| p.as_path())
}

/// Every log line passes here: HTTP and TLS crates dropped, control characters escaped (no forged lines), then
/// to the writer and maybe libc's syslog (the `syslog` crate does not reconnect after a syslogd restart; libc does).
struct Sinks {
    writer: Box<dyn Log>,
    syslog: bool,
}

impl Log for Sinks {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let target = record.target();
        if NOISY.iter().any(|n| target.strip_prefix(n).is_some_and(|r| r.is_empty() || r.starts_with("::"))) {
            return;
        }
        let message = escape(&record.args().to_string());
        if self.syslog {
            let thread = std::thread::current();
            crate::sys::syslog(record.level(), &format!("({}) {message}", thread.name().unwrap_or("?")));
        }
        let mut b = Record::builder();
        b.metadata(record.metadata().clone()).module_path(record.module_path()).file(record.file()).line(record.line());
        self.writer.log(&b.args(format_args!("{message}")).build());
    }

    fn flush(&self) {
        self.writer.flush()
    }
}

/// `text` with every control character (C0, DEL, C1) written as an escape, and the Unicode
/// format and separator characters that break a line or reorder what a terminal shows.
pub fn escape(text: &str) -> String {
    let format = |c: char| matches!(c as u32, 0x200b..=0x200f | 0x2028..=0x202e | 0x2060..=0x2069 | 0xfeff);
    text.chars().map(|c| if c.is_control() || format(c) { c.escape_default().to_string() } else { c.into() }).collect()
}

/// The HTTP and TLS crates never log: at trace level ureq-proto dumps raw request and response bytes,
/// which carry the agent key and tokens. Their failures reach our own log lines as errors anyway.
const NOISY: [&str; 3] = ["ureq", "ureq_proto", "rustls"];

/// Sets up logging once. One-shot commands log at `warn` where `log.level` is `info` (their result is printed).
pub fn init(config: &Config, one_shot: bool) -> Result<(), LogError> {
    let level = if one_shot && config.log.level == LevelFilter::Info { LevelFilter::Warn } else { config.log.level };
    let mut b = ConfigBuilder::new();
    // RFC 3339 in UTC (simplelog's default offset) and the thread's name on every line.
    b.set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Error)
        .set_thread_mode(simplelog::ThreadLogMode::Names)
        .set_thread_padding(simplelog::ThreadPadding::Off)
        .set_target_level(LevelFilter::Off);
    let writer: Box<dyn Log> = match &config.log.file {
        Some(path) => {
            let file =
                open(path, config.agent.user.as_deref()).map_err(|source| LogError { path: path.clone(), source })?;
            let shared = Arc::new(Mutex::new(file));
            let _ = FILE.set((path.clone(), shared.clone()));
            WriteLogger::new(LevelFilter::Trace, b.build(), Reopenable(shared))
        }
        None => WriteLogger::new(LevelFilter::Trace, b.build(), io::stderr()),
    };
    let syslog = config.log.syslog && !one_shot;
    if syslog {
        crate::sys::open_syslog();
    }
    // Every sink passes everything; the global max level filters, so a reload can raise or lower it (log.level is
    // applied live). Only fails if a logger is already set, which cannot happen: this runs once.
    let _ = log::set_boxed_logger(Box::new(Sinks { writer, syslog }));
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        for (raw, logged) in [
            ("id\n2026-01-01T00:00:00Z ERROR forged", "id\\n2026-01-01T00:00:00Z ERROR forged"),
            ("a\rb\tc", "a\\rb\\tc"),
            ("bell\u{7}del\u{7f}nel\u{85}esc\u{1b}[31m", "bell\\u{7}del\\u{7f}nel\\u{85}esc\\u{1b}[31m"),
            ("plain \"quoted\" é ✓ \\n", "plain \"quoted\" é ✓ \\n"),
            ("a\u{2028}b\u{202e}c\u{200b}d\u{2066}e\u{feff}", "a\\u{2028}b\\u{202e}c\\u{200b}d\\u{2066}e\\u{feff}"),
        ] {
            assert_eq!(escape(raw), logged);
        }
    }

    #[test]
    fn an_unopenable_log_file_is_named_and_its_cause_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (conf, log) = (dir.path().join("agent.toml"), dir.path().join("missing/agent.log"));
        std::fs::write(&conf, format!("[log]\nfile = {:?}\n", log.display().to_string())).unwrap();
        let err = init(&Config::load(Some(&conf)).unwrap(), true).unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot open log.file {}: ", log.display())), "{err}");
        let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(source.map(io::Error::kind), Some(io::ErrorKind::NotFound));
        assert!(file_path().is_none(), "nothing set up on failure");
    }
}
