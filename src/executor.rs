//! The command executor thread: runs what the long-poll thread received, one command at a
//! time, and reports each result exactly once through the durable queue. The command store
//! (`<data_dir>/commands.json`) makes a command run at most once (ARCHITECTURE.md, Invariants).

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, select_biased};
use serde::{Deserialize, Serialize};

use crate::commands::{self, Action, Code, Command};
use crate::config::Config;
use crate::groups::{self, MAX_FILE_BYTES, MAX_GROUPS};
use crate::host::HostInfo;
use crate::http::{Rejection, Request};
use crate::queue::Append;
use crate::session::{Call, Failure, Session};
use crate::status::{Stats, rfc3339};

/// Entries kept in the store; only reported ones are pruned, the oldest first.
pub const STORE_MAX: usize = 1000;
/// At most one `restart` in this long: a command loop must not restart the agent endlessly.
pub const RESTART_EVERY: Duration = Duration::from_secs(60);
/// At most one `set-group` or `fetch-config` starts in this long (a later one waits, within its
/// timeout): a flood of them must not download and write group files without pause.
pub const GROUPS_EVERY: Duration = Duration::from_secs(10);
/// How often results that could not be queued (queue full, disk error) are retried.
const REPORT_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum State {
    /// Kept to run at the next start (`command` holds it).
    Received,
    Running,
    Finished,
    Reported,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    id: String,
    action: String,
    state: State,
    code: Option<Code>,
    message: Option<String>,
    at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    command: Option<Command>,
}

/// The durable record of every command seen (bounded).
pub struct Store {
    path: PathBuf,
    entries: VecDeque<Entry>,
    cap: usize,
}

impl Store {
    pub fn open(data_dir: &Path) -> Store {
        let path = data_dir.join("commands.json");
        let read = std::fs::read(&path).ok().map(|b| serde_json::from_slice(&b));
        if let Some(Err(e)) = &read {
            log::error!("command store {} is damaged ({e}); starting a new one", path.display());
        }
        Store { path, entries: read.and_then(Result::ok).unwrap_or_default(), cap: STORE_MAX }
    }

    fn save(&self) -> io::Result<()> {
        let json = serde_json::to_vec(&self.entries).map_err(io::Error::other)?;
        crate::fsutil::write_atomic(&self.path, &json, 0o600)
    }

    /// Whether a `restart` was handed to the supervisor (the new process finishes it).
    fn restarting(&self) -> bool {
        self.entries.iter().any(|e| e.state == State::Running && e.action == Action::Restart.name())
    }

    /// Records `id` as running, or `keep` as received. A full store prunes its oldest reported entry; when
    /// every entry is running or holds a result not yet reported, `id` is refused, never a result lost.
    fn insert(&mut self, id: &str, action: &str, keep: Option<&Command>) -> io::Result<()> {
        let now = SystemTime::now();
        while self.entries.len() >= self.cap {
            // A recent restart stays: pruning it would let a flood of commands lift the rate limit.
            let prunable = |e: &Entry| e.state == State::Reported && !recent_restart(e, now);
            let i = self.entries.iter().position(prunable).ok_or_else(|| {
                io::Error::other(format!("all {} entries are running or hold unreported results", self.cap))
            })?;
            self.entries.remove(i);
        }
        self.entries.push_back(Entry {
            id: id.to_string(),
            action: action.to_string(),
            state: if keep.is_some() { State::Received } else { State::Running },
            code: None,
            message: None,
            at: rfc3339(now),
            command: keep.cloned(),
        });
        self.save()
    }

    /// Returns whether the change is durable.
    fn update(&mut self, id: &str, f: impl FnOnce(&mut Entry)) -> bool {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            f(e);
        }
        self.save().map_err(|e| log::error!("cannot write the command store {}: {e}", self.path.display())).is_ok()
    }
}

/// A `restart` that ran (or runs) within [`RESTART_EVERY`] before `now` (the store outlives the exec restart).
/// `at` is fixed-width RFC 3339 UTC, so text order is time order; a time after `now` (the clock went back)
/// does not count, lest it block restarts for long.
fn recent_restart(e: &Entry, now: SystemTime) -> bool {
    let window = rfc3339(now.checked_sub(RESTART_EVERY).unwrap_or(now))..=rfc3339(now);
    e.action == Action::Restart.name() && e.code.is_none_or(|c| c == Code::Success) && window.contains(&e.at)
}

/// Everything a handler needs, shared with the helper thread that runs it.
pub struct Ctx {
    /// A [`Role::Files`](crate::session::Role::Files) session that stops with the executor.
    pub session: Session,
    /// The configuration as loaded from the local file at start (its `source` is re-read).
    pub local: Config,
    pub data_dir: PathBuf,
    pub uuid: String,
    pub name: String,
    pub host: HostInfo,
}

/// The executor's channels and state.
pub struct Executor {
    pub ctx: Arc<Ctx>,
    pub queue: Sender<Append>,
    /// Asks the supervisor to stop gracefully and start again in the same process (exec).
    pub restart: Sender<()>,
    /// When the last `set-group` or `fetch-config` started ([`GROUPS_EVERY`]).
    pub last_groups: std::cell::Cell<Option<Instant>>,
}

/// One group file. Waits between attempts end at shutdown, at the command's deadline
/// (when the executor sets `cancel`) and with a cancelled command.
fn download(ctx: &Ctx, group: &str, deadline: Instant, cancel: &AtomicBool) -> Result<Vec<u8>, String> {
    if cancel.load(Ordering::Relaxed) {
        return Err("cancelled".into());
    }
    let (path, what) = (format!("/api/v1/files?file_name={group}.yml"), format!("downloading {group}.yml"));
    let call = Call { path: &path, request: Request::GetAtMost(MAX_FILE_BYTES), what: &what, until: Some(deadline) };
    match ctx.session.call(&call) {
        Ok(reply) => Ok(reply.body),
        Err(Failure::Stopped) => Err("cancelled".into()),
        Err(Failure::Refused { status: 404, .. }) => Err(format!("file {group}.yml not found on the server (404)")),
        Err(Failure::Refused { kind: Rejection::TooLarge, message, .. }) => {
            Err(format!("group file {group}.yml is refused: {message}"))
        }
        Err(Failure::Refused { status, message, .. }) => Err(format!("{what} failed: {status} {message}")),
    }
}

/// `set-group` and `fetch-config`: download every file, validate, swap the set, apply; the result message.
fn set_groups(
    ctx: &Ctx,
    groups: &[String],
    not_before: Instant,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<String, String> {
    if groups.len() > MAX_GROUPS {
        return Err(format!("refused: {} groups, more than the limit of {MAX_GROUPS}", groups.len()));
    }
    if !ctx.session.pause(not_before.saturating_duration_since(Instant::now()), Some(deadline)) {
        return Err("cancelled".into());
    }
    let download = |g: &String| download(ctx, g, deadline, cancel).map(|body| (g.clone(), body));
    let files = groups.iter().map(download).collect::<Result<Vec<_>, _>>()?;
    // One reload at a time (SIGHUP or another command).
    let _guard = ctx.session.live.reload_guard();
    let (config, ignored) = groups::merge(&ctx.local, &files).map_err(|e| e.to_string())?;
    if cancel.load(Ordering::Relaxed) {
        return Err("cancelled".into());
    }
    groups::install(&ctx.data_dir, &files).map_err(|e| format!("cannot store the group files: {e}"))?;
    ctx.session.live.set_agent_line(crate::event::agent_line(&ctx.uuid, &ctx.name, groups, &ctx.host));
    let note = match config.agent.remote_config {
        true => groups::report_ignored(&ignored),
        false => "; their settings are not applied (agent.remote_config = false)".to_string(),
    };
    let applied = ctx.session.live.apply(config);
    let names = if groups.is_empty() { "no group".to_string() } else { groups.join(", ") };
    Ok(format!("groups set to {names}; {}{note}", applied.describe()))
}

impl Executor {
    /// Queues the result event; returns whether it is durable.
    fn enqueue(&self, id: &str, code: Code, message: &str) -> bool {
        let event = commands::result_event(id, code, message);
        // A result not stored in time is not lost: it stays `Finished` and is retried.
        let r = crate::queue::append_and_wait(&self.queue, vec![event], Duration::from_secs(30));
        if !r.all_stored(1) {
            let why = r.error.as_ref().map(|e| e.to_string()).unwrap_or_default();
            log::warn!("the result of command {id} could not be queued ({why}); retrying later");
        }
        r.all_stored(1)
    }

    fn finish(&self, store: &mut Store, id: &str, code: Code, message: String) {
        if code == Code::Success {
            Stats::add(&self.ctx.session.stats.commands_succeeded, 1);
            log::info!("command {id} succeeded: {message}");
        } else {
            Stats::add(&self.ctx.session.stats.commands_failed, 1);
            log::warn!("command {id} failed (code {}): {message}", code as u8);
        }
        store.update(id, |e| (e.state, e.code, e.message) = (State::Finished, Some(code), Some(message.clone())));
        if self.enqueue(id, code, &message) {
            store.update(id, |e| e.state = State::Reported);
        }
    }

    /// Results that are finished but not yet in the queue (queue full, disk trouble).
    fn report_pending(&self, store: &mut Store) {
        // Entries are only added by `handle`, so the indices hold while this runs.
        for i in 0..store.entries.len() {
            let Entry { id, state: State::Finished, code, message, .. } = store.entries[i].clone() else { continue };
            if self.enqueue(&id, code.unwrap_or(Code::Failure), &message.unwrap_or_default()) {
                store.update(&id, |e| e.state = State::Reported);
            }
        }
    }

    /// Commands that were running when the agent stopped (a `restart` succeeded: that stop was it; any other
    /// was interrupted); then the ones kept for this start, in order, until one asks for a restart (the rest
    /// wait for the start after it) or cannot be marked running durably.
    fn recover(&self, store: &mut Store) {
        for i in 0..store.entries.len() {
            let Entry { id, action, state: State::Running, .. } = store.entries[i].clone() else { continue };
            if action == Action::Restart.name() {
                self.finish(store, &id, Code::Success, format!("agent restarted (pid {})", std::process::id()));
            } else {
                self.finish(store, &id, Code::Failure, "interrupted: the agent stopped while the command ran".into());
            }
        }
        self.report_pending(store);
        for i in 0..store.entries.len() {
            let Entry { id, state: State::Received, command: Some(c), .. } = store.entries[i].clone() else { continue };
            if !store.restarting() && store.update(&id, |e| (e.state, e.command) = (State::Running, None)) {
                self.execute(store, c);
            }
        }
    }

    /// Records a new command and runs it; at `shutdown` or once a restart was asked for, it is kept for
    /// the next start. Without a durable record a redelivery could run it twice: then it is not run.
    fn handle(&self, store: &mut Store, cmd: Command, shutdown: bool) {
        let (id, name, keep) = (&cmd.document_id, cmd.action.name(), shutdown || store.restarting());
        if store.entries.iter().any(|e| e.id == *id) {
            return log::info!("command {id} ({name}) was already received; skipped");
        }
        if let Err(e) = store.insert(id, name, keep.then_some(&cmd)) {
            return log::error!("cannot record command {id} in the command store ({e}); it is not run");
        }
        match keep {
            true => log::info!("command {id} ({name}) is stored; it runs when the agent starts again"),
            false => self.execute(store, cmd),
        }
    }

    /// Runs a recorded command (its entry is `running`).
    fn execute(&self, store: &mut Store, cmd: Command) {
        let id = cmd.document_id.clone();
        log::info!("running command {id}: {} (timeout {}s)", cmd.action.name(), cmd.timeout.as_secs());
        let groups = match &cmd.action {
            Action::Unknown { .. } => return self.finish(store, &id, Code::Failure, "Command is not valid".into()),
            Action::Invalid { reason, .. } => {
                return self.finish(store, &id, Code::Failure, format!("Command is not valid: {reason}"));
            }
            Action::Restart => {
                if store.entries.iter().any(|e| e.id != id && recent_restart(e, SystemTime::now())) {
                    let why = format!("restart refused: at most one restart every {}s", RESTART_EVERY.as_secs());
                    return self.finish(store, &id, Code::Failure, why);
                }
                // Finished by the next process (see `recover`).
                if self.restart.send(()).is_err() {
                    self.finish(store, &id, Code::Failure, "the agent is shutting down".into());
                }
                return;
            }
            Action::SetGroup { groups } => groups.clone(),
            Action::FetchConfig => groups::current(&self.ctx.data_dir),
        };
        let (now, deadline) = (Instant::now(), Instant::now() + cmd.timeout);
        let not_before = self.last_groups.get().map_or(now, |t| (t + GROUPS_EVERY).max(now));
        self.last_groups.set(Some(not_before));
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (ctx, c2) = (self.ctx.clone(), cancel.clone());
        let spawned = std::thread::Builder::new().name("command".into()).stack_size(512 * 1024).spawn(move || {
            let _ = tx.send(set_groups(&ctx, &groups, not_before, deadline, &c2));
        });
        if let Err(e) = spawned {
            return self.finish(store, &id, Code::Failure, format!("cannot start the command: {e}"));
        }
        match rx.recv_deadline(deadline) {
            Ok(Ok(message)) => self.finish(store, &id, Code::Success, message),
            Ok(Err(e)) if Instant::now() < deadline => self.finish(store, &id, Code::Failure, e),
            // The helper's own wait ends at the deadline too, and may answer first: a timeout.
            Ok(Err(_)) | Err(_) => {
                // The helper sees the flag before it changes anything.
                cancel.store(true, Ordering::Relaxed);
                self.finish(store, &id, Code::Timeout, format!("timed out after {}s", cmd.timeout.as_secs()));
            }
        }
    }
}

/// The executor thread's loop.
pub fn run(exec: Executor, commands: Receiver<Command>, shutdown: Receiver<()>) {
    let mut store = Store::open(&exec.ctx.data_dir);
    exec.recover(&mut store);
    loop {
        let pending = store.entries.iter().any(|e| e.state == State::Finished);
        let wait = if pending { REPORT_RETRY } else { Duration::from_secs(3600) };
        // Shutdown first: what is queued then is stored below, as are the commands after a restart.
        select_biased! {
            recv(shutdown) -> _ => break,
            recv(commands) -> msg => match msg {
                Ok(cmd) => exec.handle(&mut store, cmd, false),
                Err(_) => break,
            },
            default(wait) => exec.report_pending(&mut store),
        }
    }
    // Kept for the next start: the server counts them as delivered. 1 s bounds a stuck poll (its request is cut).
    while let Ok(cmd) = commands.recv_timeout(Duration::from_secs(1)) {
        exec.handle(&mut store, cmd, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;
    use crate::credentials::Secret;
    use crate::live::Live;
    use crate::session::{Role, Stop};
    use crate::token::TokenCell;
    use std::io::{Read, Write};

    impl Store {
        fn contains(&self, id: &str) -> bool {
            self.entries.iter().any(|e| e.id == id)
        }
    }

    /// A download running in its own thread against a server that answers 503 with
    /// `Retry-After: 60`.
    struct Waiting {
        /// Dropped: shutdown.
        stop: Sender<()>,
        done: Receiver<Result<Vec<u8>, String>>,
        /// A message per request the server answered.
        asked: Receiver<()>,
    }

    /// A context whose files session talks to a server that sends `answer` to every request.
    fn serving(answer: Vec<u8>) -> (Arc<Ctx>, Sender<()>, Receiver<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (asked_tx, asked) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let _ = s.read(&mut [0u8; 4096]);
                let _ = s.write_all(&answer);
                let _ = asked_tx.send(());
            }
        });
        let mut local = Config::defaults();
        local.retry = RetryConfig { initial: Duration::from_secs(60), max: Duration::from_secs(60) };
        let (cell, _wake) = TokenCell::new();
        cell.publish(Secret::new("jwt".into()), url, SystemTime::now());
        let live = Live::new(local.clone(), String::new());
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let session = Session {
            agent: crate::http::build_agent(&local.server, Duration::from_secs(5)).unwrap(),
            cell,
            live,
            stats: Arc::new(Stats::default()),
            stop: Stop::Now(stop_rx),
            role: Role::Files,
        };
        let host = crate::host::gather(Path::new("/"));
        let data_dir = std::env::temp_dir();
        (Arc::new(Ctx { session, local, data_dir, uuid: "u".into(), name: "n".into(), host }), stop_tx, asked)
    }

    fn download_waiting_a_minute(deadline: Instant) -> Waiting {
        let busy = b"HTTP/1.1 503 Busy\r\nRetry-After: 60\r\nContent-Length: 0\r\n\r\n".to_vec();
        let (ctx, stop, asked) = serving(busy);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || done_tx.send(download(&ctx, "g1", deadline, &AtomicBool::new(false))));
        Waiting { stop, done, asked }
    }

    fn file_of(bytes: usize) -> Result<Vec<u8>, String> {
        let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {bytes}\r\n\r\n").into_bytes();
        answer.resize(answer.len() + bytes, b'#');
        let (ctx, _stop, _asked) = serving(answer);
        download(&ctx, "g1", Instant::now() + Duration::from_secs(30), &AtomicBool::new(false))
    }

    #[test]
    #[cfg_attr(not(feature = "webpki-roots"), ignore = "its HTTP agent needs the built-in roots")]
    fn a_group_file_over_1_mib_is_refused_at_once() {
        assert_eq!(file_of(1 << 20).map(|b| b.len()), Ok(1 << 20));
        let e = file_of((1 << 20) + 1).unwrap_err();
        assert_eq!(e, "group file g1.yml is refused: the answer is larger than the limit of 1048576 bytes");
    }

    #[test]
    #[cfg_attr(not(feature = "webpki-roots"), ignore = "its HTTP agent needs the built-in roots")]
    fn more_than_64_groups_are_refused_before_any_download() {
        let (ctx, _stop, asked) = serving(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec());
        let groups: Vec<String> = (0..65).map(|i| format!("g{i}")).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let e = set_groups(&ctx, &groups, Instant::now(), deadline, &AtomicBool::new(false)).unwrap_err();
        assert_eq!(e.to_string(), "refused: 65 groups, more than the limit of 64");
        assert!(asked.try_recv().is_err(), "nothing was downloaded");
    }

    #[test]
    #[cfg_attr(not(feature = "webpki-roots"), ignore = "its HTTP agent needs the built-in roots")]
    fn a_download_waiting_to_retry_ends_at_shutdown() {
        let Waiting { stop, done, asked } = download_waiting_a_minute(Instant::now() + Duration::from_secs(300));
        asked.recv_timeout(Duration::from_secs(10)).expect("the server was asked");
        assert!(done.recv_timeout(Duration::from_millis(300)).is_err(), "waiting for the minute to pass");
        drop(stop);
        let result = done.recv_timeout(Duration::from_secs(5)).expect("shutdown ended the wait");
        assert_eq!(result, Err("cancelled".to_string()));
    }

    #[test]
    #[cfg_attr(not(feature = "webpki-roots"), ignore = "its HTTP agent needs the built-in roots")]
    fn a_download_waiting_to_retry_ends_at_the_command_deadline() {
        // The executor sets `cancel` when the command's deadline passes; the wait ends then.
        let Waiting { stop: _stop, done, asked } = download_waiting_a_minute(Instant::now() + Duration::from_secs(2));
        asked.recv_timeout(Duration::from_secs(10)).expect("the server was asked");
        let result = done.recv_timeout(Duration::from_secs(10)).expect("the deadline ended the wait");
        assert_eq!(result, Err("cancelled".to_string()));
    }

    #[test]
    fn store_survives_reopen_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path());
        s.cap = 20;
        s.insert("running", "restart", None).unwrap();
        for i in 0..30 {
            s.insert(&format!("id{i}"), "set-group", None).unwrap();
            s.update(&format!("id{i}"), |e| e.state = State::Reported);
        }
        let s = Store::open(dir.path());
        assert_eq!(s.entries.len(), 20);
        assert!(s.contains("id29"));
        assert!(!s.contains("id0"), "oldest reported pruned");
        assert!(s.contains("running"), "unfinished entries are kept while reported ones remain");
    }

    #[test]
    fn a_full_store_refuses_a_new_command_rather_than_lose_a_result() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path());
        s.cap = 3;
        for (id, state) in [("done", State::Finished), ("busy", State::Running), ("sent", State::Reported)] {
            s.insert(id, "set-group", None).unwrap();
            s.update(id, |e| e.state = state);
        }
        s.insert("next", "set-group", None).unwrap();
        assert!(!s.contains("sent") && s.contains("next"), "the reported entry is pruned first");
        s.update("next", |e| e.state = State::Finished);
        assert!(s.insert("more", "set-group", None).is_err(), "nothing can be pruned: the new command is refused");
        let s = Store::open(dir.path());
        let ids: Vec<&str> = s.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["done", "busy", "next"], "no unreported result and no running command was dropped");
    }

    #[test]
    fn stored_codes_stay_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"[{"id":"a","action":"restart","state":"finished","code":3,"message":"m","at":"t"},
                      {"id":"b","action":"set-group","state":"running","at":"t"}]"#;
        std::fs::write(dir.path().join("commands.json"), old).unwrap();
        let mut s = Store::open(dir.path());
        assert_eq!((s.entries[0].code, s.entries[1].code), (Some(Code::Timeout), None));
        s.update("b", |e| e.code = Some(Code::Failure));
        let text = std::fs::read_to_string(dir.path().join("commands.json")).unwrap();
        assert!(text.contains(r#""code":3"#) && text.contains(r#""code":1"#), "{text}");
    }

    #[test]
    fn restarts_in_the_store_rate_limit_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path());
        let now = SystemTime::now();
        let recent =
            |s: &Store, id| s.entries.iter().any(|e| e.id != id && recent_restart(e, now + Duration::from_secs(1)));
        assert!(!recent(&s, "r1"), "an empty store");
        s.insert("r1", "restart", None).unwrap();
        assert!(!recent(&s, "r1"), "the command itself does not count");
        assert!(recent(&Store::open(dir.path()), "r2"), "a running restart counts, also after a reopen");
        s.update("r1", |e| e.code = Some(Code::Success));
        assert!(recent(&s, "r2"), "a finished restart counts");
        s.update("r1", |e| e.code = Some(Code::Failure));
        s.insert("sg", "set-group", None).unwrap();
        assert!(!recent(&s, "r2"), "a refused restart and other commands do not");
        s.update("r1", |e| (e.code, e.at) = (None, rfc3339(now - 2 * RESTART_EVERY)));
        assert!(!recent(&s, "r2"), "a restart over a minute ago does not");
        s.update("r1", |e| e.at = rfc3339(now + RESTART_EVERY));
        assert!(!recent(&s, "r2"), "nor one in the future (the clock went back)");
    }

    #[test]
    fn a_full_store_keeps_the_last_restart_so_a_flood_cannot_lift_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path());
        s.cap = 3;
        s.insert("r1", "restart", None).unwrap();
        s.update("r1", |e| (e.state, e.code) = (State::Reported, Some(Code::Success)));
        for i in 0..10 {
            let id = format!("x{i}");
            s.insert(&id, "set-group", None).unwrap();
            s.update(&id, |e| e.state = State::Reported);
        }
        assert!(
            s.entries.iter().any(|e| e.id != "r2" && recent_restart(e, SystemTime::now())),
            "the restart was not pruned"
        );
        assert_eq!(s.entries.len(), 3);
    }

    #[test]
    fn a_kept_command_is_stored_whole_and_marks_no_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path());
        let cmd = Command {
            document_id: "k1".into(),
            action: Action::SetGroup { groups: vec!["g1".into()] },
            timeout: Duration::from_secs(7),
        };
        s.insert("r1", "restart", None).unwrap();
        s.insert("k1", "set-group", Some(&cmd)).unwrap();
        assert!(s.restarting(), "the running restart");
        let s = Store::open(dir.path());
        assert_eq!((s.entries[1].state, s.entries[1].command.as_ref()), (State::Received, Some(&cmd)));
        assert!(s.contains("k1"), "a redelivery is a duplicate");
    }

    #[test]
    fn damaged_store_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("commands.json"), "{{{").unwrap();
        assert!(Store::open(dir.path()).entries.is_empty());
    }
}
