//! Counters shared by the threads (atomics only) and `<run_dir>/state.json` (README, Status).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How often state.json is rewritten; `--status` calls an agent dead after 3 intervals.
pub const STATE_INTERVAL: Duration = Duration::from_secs(5);

/// Process-wide counters. Every field is written by one owner and read by the supervisor.
#[derive(Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub rejected: AtomicU64,
    pub buffered: AtomicU64,
    pub queued: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub batches_sent: AtomicU64,
    pub batches_failed: AtomicU64,
    pub retries: AtomicU64,
    pub commands_received: AtomicU64,
    pub commands_succeeded: AtomicU64,
    pub commands_failed: AtomicU64,
    pub connected: AtomicBool,
    /// Unix seconds; 0 = no token.
    pub token_expires_at: AtomicI64,
    /// The server whose 5xx to gzip bodies turned compression off until restart (session.rs).
    pub gzip_refused: OnceLock<String>,
    last_error: Mutex<Option<String>>,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_error(&self, message: impl Into<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.into());
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct EventCounts {
    pub received: u64,
    pub sent: u64,
    pub dropped: u64,
    pub rejected: u64,
    pub buffered: u64,
    pub queued: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct BatchCounts {
    pub sent: u64,
    pub failed: u64,
    pub retries: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct CommandCounts {
    pub received: u64,
    pub succeeded: u64,
    pub failed: u64,
}

/// The state.json document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub pid: u32,
    pub uuid: String,
    pub server: String,
    pub connected: bool,
    pub token_expires_at: Option<String>,
    pub updated_at: String,
    /// Unix seconds of `updated_at`, so `--status` needs no date parser.
    pub updated_at_unix: i64,
    pub events: EventCounts,
    pub batches: BatchCounts,
    pub commands: CommandCounts,
    pub queued_bytes: u64,
    pub last_error: Option<String>,
    /// `none (gzip refused by <server>)` after the gzip fallback; null: `server.compression` as set.
    pub compression: Option<String>,
    pub version: String,
}

impl State {
    pub fn capture(s: &Stats, uuid: &str, server: &str, now: SystemTime) -> State {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let exp = s.token_expires_at.load(Ordering::Relaxed);
        let [received, sent, dropped, rejected, buffered, queued] =
            [&s.received, &s.sent, &s.dropped, &s.rejected, &s.buffered, &s.queued].map(g);
        let [succeeded, failed] = [&s.commands_succeeded, &s.commands_failed].map(g);
        State {
            pid: std::process::id(),
            uuid: uuid.to_string(),
            server: server.to_string(),
            connected: s.connected.load(Ordering::Relaxed),
            token_expires_at: (exp > 0).then(|| rfc3339(UNIX_EPOCH + Duration::from_secs(exp as u64))),
            updated_at: rfc3339(now),
            updated_at_unix: unix(now),
            events: EventCounts { received, sent, dropped, rejected, buffered, queued },
            batches: BatchCounts { sent: g(&s.batches_sent), failed: g(&s.batches_failed), retries: g(&s.retries) },
            commands: CommandCounts { received: g(&s.commands_received), succeeded, failed },
            queued_bytes: g(&s.queued_bytes),
            last_error: s.last_error(),
            compression: s.gzip_refused.get().map(|server| format!("none (gzip refused by {server})")),
            version: crate::VERSION.to_string(),
        }
    }
}

pub fn state_path(run_dir: &Path) -> PathBuf {
    run_dir.join("state.json")
}

/// Writes state.json atomically (a reader never sees half a file).
pub fn write_state(run_dir: &Path, state: &State) -> std::io::Result<()> {
    let mut json = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    json.push(b'\n');
    crate::fsutil::write_atomic(&state_path(run_dir), &json, 0o644)
}

/// Why `--status` says "not running" (its `reason`).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotRunning {
    /// Never started, or stopped cleanly and removed it.
    #[error("no {}", .0.display())]
    NoState(PathBuf),
    #[error("unreadable state file: {0}")]
    Unreadable(String),
    #[error("process {0} is not running")]
    Dead(u32),
    /// Not updated for more than 3 intervals.
    #[error("state not updated for {age_secs}s")]
    Stale { age_secs: i64 },
}

/// Reads state.json and decides whether the agent is running (README, Status): the state if readable, the verdict.
pub fn read_status(run_dir: &Path, now: SystemTime) -> (Option<State>, Result<(), NotRunning>) {
    let path = state_path(run_dir);
    let read = crate::fsutil::read_nofollow(&path); // root runs it: no link, no FIFO to wait on
    let state: State = match read.and_then(|bytes| Ok(serde_json::from_slice(&bytes)?)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (None, Err(NotRunning::NoState(path))),
        Err(e) => return (None, Err(NotRunning::Unreadable(e.to_string()))),
    };
    let verdict = match unix(now) - state.updated_at_unix {
        _ if !crate::sys::process_exists(state.pid) => Err(NotRunning::Dead(state.pid)),
        age if age > 3 * STATE_INTERVAL.as_secs() as i64 => Err(NotRunning::Stale { age_secs: age }),
        _ => Ok(()),
    };
    (Some(state), verdict)
}

pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or_else(|e| -(e.duration().as_secs() as i64), |d| d.as_secs() as i64)
}

/// RFC 3339 UTC with milliseconds: `2026-11-26T15:00:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    // Years past 9999 (only a bogus timestamp has them) do not fit RFC 3339: the last second of 9999 stands in.
    let max = time::PrimitiveDateTime::MAX.assume_utc();
    let t = time::OffsetDateTime::from_unix_timestamp(d.as_secs() as i64).unwrap_or(max);
    let (y, m, day, h, min, s) = (t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second());
    format!("{y:04}-{m:02}-{day:02}T{h:02}:{min:02}:{s:02}.{:03}Z", d.subsec_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_table() {
        let table: &[(u64, u32, &str)] = &[
            (0, 0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, 5, "2000-02-29T00:00:00.005Z"),
            (1_795_705_200, 123, "2026-11-26T15:00:00.123Z"),
            (4_102_444_799, 999, "2099-12-31T23:59:59.999Z"),
            // Past year 9999: the last second of 9999.
            (1 << 40, 7, "9999-12-31T23:59:59.007Z"),
        ];
        for (secs, ms, want) in table {
            let t = UNIX_EPOCH + Duration::from_secs(*secs) + Duration::from_millis(*ms as u64);
            assert_eq!(rfc3339(t), *want);
        }
    }

    #[test]
    fn status_of_missing_dead_stale_and_live_agents() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        assert_eq!(read_status(dir.path(), now).1, Err(NotRunning::NoState(state_path(dir.path()))));
        let stats = Stats::default();
        let mut s = State::capture(&stats, "u", "https://s", now);
        write_state(dir.path(), &s).unwrap();
        assert_eq!(read_status(dir.path(), now), (Some(s.clone()), Ok(())));
        let later = now + Duration::from_secs(16);
        assert!(matches!(read_status(dir.path(), later).1, Err(NotRunning::Stale { .. })));
        s.pid = i32::MAX as u32;
        write_state(dir.path(), &s).unwrap();
        assert_eq!(read_status(dir.path(), now).1, Err(NotRunning::Dead(i32::MAX as u32)));
    }
}
