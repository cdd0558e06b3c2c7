//! The local ingestion socket `<run_dir>/ingest.sock` (docs/protocol.md, Ingest socket) and its client, `--send`.
//! Each connection has a thread of its own, so a slow or stuck producer (bounded by a read timeout) never holds
//! up the others; its reply is written after the queue fsynced its stateful events.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::event::{self, Event, Kind};
use crate::queue::Append;
use crate::status::Stats;

/// A producer that sends nothing for this long is answered and dropped.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent producer connections; more are told to retry (bounds threads and memory).
pub const MAX_CONNECTIONS: usize = 64;
/// With every slot busy, a connection open this long gives way to a new one: long enough for a burst, short enough
/// that a producer turned away gets in on its next tries.
const OLDEST: Duration = Duration::from_secs(10);
/// Stateless events are handed to the batcher in chunks of this many, or of this many bytes:
/// 64 connections × (a chunk in the making + a line) stays far below the ring buffer's bytes.
const CHUNK: usize = 512;
const CHUNK_BYTES: usize = 256 << 10;
/// Stateful events are made durable at least every this many bytes (bounds a connection's memory; fsyncs are shared).
const DURABLE_CHUNK_BYTES: usize = 256 << 10;
/// Longest wait for the fsync that makes a connection's stateful events durable.
const DURABLE_WAIT: Duration = Duration::from_secs(120);
/// The reply lists at most this many errors (then a count), to stay one reasonable line.
const MAX_REPLY_ERRORS: usize = 1000;
/// `sun_path` is 108 bytes including the terminating NUL on Linux.
const MAX_SOCKET_PATH: usize = 107;

/// The reply line.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    pub accepted: u64,
    pub rejected: u64,
    pub errors: Vec<String>,
}

/// Why the socket could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(
        "ingest socket path {} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter agent.run_dir",
        path.display()
    )]
    PathTooLong { path: PathBuf },
    /// Another process already serves the socket (a second agent).
    #[error("{} is served by another running agent; stop it first", path.display())]
    InUse { path: PathBuf },
    /// Creating, binding or connecting failed.
    #[error("ingest socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// `--send`: the agent is not running (no socket, or nobody listening).
    #[error("the agent is not running (cannot connect to {}: {source})", path.display())]
    NotRunning { path: PathBuf, source: io::Error },
    /// `--send`: the socket exists but this account may not use it.
    #[error("permission denied on {}: {source} (run as root or a member of the socket's group)", path.display())]
    Denied { path: PathBuf, source: io::Error },
    #[error("unexpected reply from the agent: {0}")]
    BadReply(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IngestError + '_ {
    move |source| IngestError::Io { path: path.to_path_buf(), source }
}

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("ingest.sock")
}

/// Binds the socket (mode 0660), replacing a stale socket file left by a crash, never one another agent serves.
pub fn bind(run_dir: &Path) -> Result<UnixListener, IngestError> {
    let path = socket_path(run_dir);
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(IngestError::PathTooLong { path });
    }
    // Beneath a handle on run_dir, reached as the pid file is: a run_dir swapped for a link since is not followed.
    let dir = crate::fsutil::open_path(run_dir, false).map_err(io_err(&path))?;
    let at = crate::fsutil::fd_path(&dir).join("ingest.sock");
    if std::fs::symlink_metadata(&at).is_ok() {
        if UnixStream::connect(&at).is_ok() {
            return Err(IngestError::InUse { path });
        }
        std::fs::remove_file(&at).map_err(io_err(&path))?;
    }
    let listener = UnixListener::bind(&at).map_err(io_err(&path))?;
    crate::fsutil::chmod_nofollow(&at, 0o660).map_err(io_err(&path))?;
    Ok(listener)
}

/// What each connection needs; shared by the acceptor and its connection threads.
pub struct Ingest {
    pub stateless: Sender<Vec<Event>>,
    pub queue: Sender<Append>,
    pub stats: Arc<Stats>,
    stopping: AtomicBool,
    active: AtomicUsize,
    next_id: AtomicUsize,
    /// A handle on each open connection, when it last completed a line and when it opened: shutdown ends blocked
    /// reads, and a new producer finding every slot taken ends one (`evict`).
    open: Mutex<HashMap<usize, (UnixStream, Instant, Instant)>>,
    evicted: AtomicBool,
}

impl Ingest {
    pub fn new(stateless: Sender<Vec<Event>>, queue: Sender<Append>, stats: Arc<Stats>) -> Ingest {
        let (stopping, active, next_id, open, evicted) = Default::default();
        Ingest { stateless, queue, stats, stopping, active, next_id, open, evicted }
    }

    /// Every slot taken: ends the connection that completed no line for longest, a second at least, else the oldest,
    /// open for `OLDEST` at least, so that neither trickling nor chatty producers can keep the others out for long
    /// (the ended one's thread answers for what it read and frees the slot). Logged once.
    fn evict(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let pick = |at: fn(&(UnixStream, Instant, Instant)) -> Instant, after| {
            open.iter().map(|(id, c)| (at(c), *id)).min().filter(|(t, _)| t.elapsed() >= after).map(|(_, id)| id)
        };
        let victim = pick(|c| c.1, Duration::from_secs(1)).or_else(|| pick(|c| c.2, OLDEST));
        let Some((stream, ..)) = victim.and_then(|id| open.remove(&id)) else { return false };
        if !self.evicted.swap(true, Ordering::Relaxed) {
            log::warn!(
                "ingest socket: every slot taken; the connection idle (else open) longest is ended for a new one"
            );
        }
        stream.shutdown(std::net::Shutdown::Read).is_ok()
    }

    /// Shutdown, step 1: no new lines are read; connections answer for what they have
    /// read and close. Returns once none is left, or after `limit`.
    pub fn stop(&self, run_dir: &Path, limit: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor's blocking accept().
        let _ = UnixStream::connect(socket_path(run_dir));
        for (s, ..) in self.open.lock().unwrap_or_else(|p| p.into_inner()).values() {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
        let until = std::time::Instant::now() + limit;
        // Polling only during shutdown, for at most `limit`.
        while self.active.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The acceptor thread. Ends after [`Ingest::stop`] (which wakes the blocking accept).
pub fn run(listener: UnixListener, ingest: Arc<Ingest>) {
    for conn in listener.incoming() {
        if ingest.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("ingest socket: accept failed: {e}");
                // EMFILE and friends: do not spin while the condition lasts.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if ingest.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS && !ingest.evict() {
            ingest.active.fetch_sub(1, Ordering::SeqCst);
            let errors = vec![format!("too many producers at once (limit {MAX_CONNECTIONS}); retry")];
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = write_reply(&stream, &Reply { errors, ..Reply::default() });
            continue;
        }
        let id = ingest.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            ingest.open.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (clone, Instant::now(), Instant::now()));
        }
        let ingest2 = ingest.clone();
        let spawned = std::thread::Builder::new().name("ingest-conn".into()).stack_size(256 * 1024).spawn(move || {
            handle(stream, &ingest2, id);
            ingest2.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            ingest2.active.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            ingest.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            ingest.active.fetch_sub(1, Ordering::SeqCst);
            log::error!("cannot start a thread for an ingest connection: {e}");
        }
    }
}

fn write_reply(mut stream: &UnixStream, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// What one connection has read and not yet handed over, and its reply so far.
#[derive(Default)]
struct Conn {
    reply: Reply,
    stateless: Vec<Event>,
    stateless_bytes: usize,
    /// Stateful events with their line numbers.
    stateful: Vec<(Event, u64)>,
    stateful_bytes: usize,
    hidden_errors: u64,
}

impl Conn {
    fn reject(&mut self, ingest: &Ingest, line: u64, why: impl fmt::Display) {
        self.reply.rejected += 1;
        Stats::add(&ingest.stats.rejected, 1);
        if self.reply.errors.len() < MAX_REPLY_ERRORS {
            self.reply.errors.push(format!("line {line}: {why}"));
        } else {
            self.hidden_errors += 1;
        }
    }

    fn flush_stateless(&mut self, ingest: &Ingest) {
        if self.stateless.is_empty() {
            return;
        }
        let chunk = std::mem::take(&mut self.stateless);
        self.stateless_bytes = 0;
        let n = chunk.len() as u64;
        // Blocks only under overflow = "block" with a full buffer: backpressure by design.
        if ingest.stateless.send(chunk).is_ok() {
            self.reply.accepted += n;
            Stats::add(&ingest.stats.received, n);
        } else {
            self.reply.rejected += n;
            self.reply.errors.push(format!("{n} events not accepted: the agent is shutting down"));
        }
    }

    fn flush_stateful(&mut self, ingest: &Ingest) {
        if self.stateful.is_empty() {
            return;
        }
        let (events, lines): (Vec<Event>, Vec<u64>) = std::mem::take(&mut self.stateful).into_iter().unzip();
        self.stateful_bytes = 0;
        // Bounded: a queue stuck on a dying disk must not hold the producer for ever (it
        // is told the lines were not accepted and may send them again).
        let result = crate::queue::append_and_wait(&ingest.queue, events, DURABLE_WAIT);
        let stored = result.stored.min(lines.len());
        self.reply.accepted += stored as u64;
        Stats::add(&ingest.stats.received, stored as u64);
        if let Some(e) = result.error {
            for l in &lines[stored..] {
                self.reject(ingest, *l, &e);
            }
        }
    }

    /// One complete line (`oversized`: its bytes were not kept).
    fn line(&mut self, ingest: &Ingest, number: u64, bytes: &[u8], oversized: bool) {
        if oversized {
            self.reject(ingest, number, format!("line is longer than {} bytes", event::MAX_LINE_BYTES));
            return;
        }
        match event::parse_line(bytes) {
            Ok(None) => {}
            Ok(Some(e)) if e.kind == Kind::Stateless => {
                self.stateless_bytes += e.wire_len();
                self.stateless.push(e);
                if self.stateless.len() >= CHUNK || self.stateless_bytes >= CHUNK_BYTES {
                    self.flush_stateless(ingest);
                }
            }
            Ok(Some(e)) => {
                self.stateful_bytes += e.wire_len();
                self.stateful.push((e, number));
                if self.stateful_bytes >= DURABLE_CHUNK_BYTES {
                    self.flush_stateful(ingest);
                }
            }
            Err(e) => self.reject(ingest, number, e),
        }
    }
}

/// Serves one producer: lines until EOF, then the reply.
fn handle(stream: UnixStream, ingest: &Ingest, id: usize) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let mut reader = BufReader::with_capacity(64 * 1024, &stream);
    let (mut conn, mut line, mut number, mut marked) = (Conn::default(), Vec::new(), 0u64, Instant::now());
    // A line may be one byte longer than the limit (a '\r' the parser drops), plus its newline.
    let limit = event::MAX_LINE_BYTES as u64 + 2;
    loop {
        if ingest.stopping.load(Ordering::Relaxed) {
            conn.reply.errors.push(format!("the agent is shutting down; lines after {number} were not read"));
            break;
        }
        line.clear();
        let mut read = (&mut reader).take(limit).read_until(b'\n', &mut line);
        let complete = line.last() == Some(&b'\n');
        let oversized = !complete && line.len() as u64 == limit;
        if oversized {
            // Not buffered further: the rest of the line is read and thrown away.
            read = reader.skip_until(b'\n');
        }
        match read {
            Err(e) => {
                let why = if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                    format!("nothing received for {}s", READ_TIMEOUT.as_secs())
                } else {
                    e.to_string()
                };
                conn.reply.errors.push(format!("read stopped after line {number}: {why}"));
                break;
            }
            // EOF. If the agent's shutdown (not the producer) shut the read side, the check
            // above answers; otherwise a last line without a newline still counts.
            Ok(_) if !complete && ingest.stopping.load(Ordering::Relaxed) => {}
            Ok(0) if line.is_empty() => break,
            Ok(_) => {
                number += 1;
                // The shared list is touched at most every 250 ms, not per line: eviction looks for a second idle.
                if marked.elapsed() >= Duration::from_millis(250) {
                    marked = Instant::now();
                    ingest.open.lock().unwrap_or_else(|p| p.into_inner()).entry(id).and_modify(|c| c.1 = marked);
                }
                conn.line(ingest, number, line.strip_suffix(b"\n").unwrap_or(&line), oversized);
            }
        }
    }
    conn.flush_stateless(ingest);
    conn.flush_stateful(ingest);
    if conn.hidden_errors > 0 {
        conn.reply.errors.push(format!("… and {} more rejected lines", conn.hidden_errors));
    }
    let _ = write_reply(&stream, &conn.reply);
}

/// `--send`: stdin → the socket → the reply. Returns the reply.
pub fn send(run_dir: &Path, input: &mut dyn Read) -> Result<Reply, IngestError> {
    let path = socket_path(run_dir);
    let mut stream = UnixStream::connect(&path).map_err(|source| match source.kind() {
        io::ErrorKind::PermissionDenied => IngestError::Denied { path: path.clone(), source },
        _ => IngestError::NotRunning { path: path.clone(), source },
    })?;
    io::copy(input, &mut stream).map_err(io_err(&path))?;
    stream.shutdown(std::net::Shutdown::Write).map_err(io_err(&path))?;
    let mut reply = String::new();
    // Bounded: whoever listens there (run_dir may be agent.user's) must not grow a root producer's memory.
    BufReader::new(stream.take(8 << 20)).read_line(&mut reply).map_err(io_err(&path))?;
    serde_json::from_str(reply.trim_end())
        .map_err(|_| IngestError::BadReply(reply.trim_end().chars().take(200).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn socket_path_too_long_is_named() {
        let long = PathBuf::from(format!("/tmp/{}", "r".repeat(120)));
        let e = bind(&long).unwrap_err().to_string();
        assert!(e.contains("longer than 107 bytes") && e.contains("agent.run_dir"), "{e}");
    }

    #[test]
    fn stale_socket_file_is_replaced_but_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let first = bind(dir.path()).unwrap();
        assert!(matches!(bind(dir.path()), Err(IngestError::InUse { .. })));
        drop(first);
        // The file is still there (a crash leaves it); nobody listens: it is replaced.
        assert!(socket_path(dir.path()).exists());
        let _second = bind(dir.path()).unwrap();
        let mode = std::fs::metadata(socket_path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }

    /// Serves `input` on one connection (stateless lines only); returns the reply and
    /// the events handed to the batcher.
    fn serve(input: &[u8]) -> (Reply, Vec<Event>) {
        let (tx, rx) = crossbeam_channel::bounded(64);
        let (queue, _queue_rx) = crossbeam_channel::bounded(1);
        let ingest = Ingest::new(tx, queue, Arc::new(Stats::default()));
        let (mut client, server) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || handle(server, &ingest, 0));
        client.write_all(input).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        BufReader::new(client).read_line(&mut reply).unwrap();
        t.join().unwrap();
        (serde_json::from_str(&reply).unwrap(), rx.try_iter().flatten().collect())
    }

    fn line(i: usize) -> String {
        format!(r#"{{"header":{{"module":"m{i}"}},"data":{{}}}}"#)
    }

    #[test]
    fn line_limits_crlf_and_a_last_line_without_newline() {
        let max = event::MAX_LINE_BYTES;
        // A line of max + 1 bytes reaches the parser (which names its size); one longer is
        // not buffered at all.
        let input = [
            line(1) + "\r\n",
            "x".repeat(max + 1) + "\n",
            "y".repeat(max + 2) + "\n",
            line(4) + "\n",
            "z".repeat(3 * max) + "\n",
            line(6),
        ]
        .concat();
        let (reply, events) = serve(input.as_bytes());
        let longer = format!("line is longer than {max} bytes");
        let errors = [
            format!("line 2: line is {} bytes; at most {max} are accepted", max + 1),
            format!("line 3: {longer}"),
            format!("line 5: {longer}"),
        ];
        assert_eq!(reply, Reply { accepted: 3, rejected: 3, errors: errors.to_vec() });
        let modules: Vec<&str> = events.iter().map(|e| e.header()).collect();
        assert_eq!(modules, [r#"{"module":"m1"}"#, r#"{"module":"m4"}"#, r#"{"module":"m6"}"#]);
        // An oversized last line without a newline is still answered for.
        let (reply, _) = serve(("w".repeat(max + 2)).as_bytes());
        assert_eq!(reply, Reply { accepted: 0, rejected: 1, errors: vec![format!("line 1: {longer}")] });
    }

    #[test]
    fn shutdown_answers_for_the_lines_read_and_drops_a_partial_one() {
        let (tx, rx) = crossbeam_channel::bounded(64);
        let (queue, _queue_rx) = crossbeam_channel::bounded(1);
        let ingest = Arc::new(Ingest::new(tx, queue, Arc::new(Stats::default())));
        let (mut client, server) = UnixStream::pair().unwrap();
        ingest.open.lock().unwrap().insert(0, (server.try_clone().unwrap(), Instant::now(), Instant::now()));
        let conn = ingest.clone();
        let t = std::thread::spawn(move || handle(server, &conn, 0));
        let full: String = (0..CHUNK).map(|i| line(i) + "\n").collect();
        client.write_all(format!("{full}{{\"header\":").as_bytes()).unwrap();
        // The first chunk reached the batcher: every complete line was read.
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap().len(), CHUNK);
        ingest.stop(Path::new("/nonexistent"), Duration::from_secs(5));
        let mut reply = String::new();
        BufReader::new(client).read_line(&mut reply).unwrap();
        t.join().unwrap();
        let reply: Reply = serde_json::from_str(&reply).unwrap();
        let errors = vec![format!("the agent is shutting down; lines after {CHUNK} were not read")];
        assert_eq!(reply, Reply { accepted: CHUNK as u64, rejected: 0, errors });
    }
}
