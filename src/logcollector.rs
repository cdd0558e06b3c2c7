//! The logcollector thread: follows `logcollector.files` like `tail -F` and sends each line as a stateless
//! event (docs/events.md) under delivery receipts (ARCHITECTURE.md): a saved offset moves only past what
//! the server took. Rotation, truncation and the saved state (`logcollector.json`): README, "Logcollector".

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{File, Metadata};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::select;
use serde::{Deserialize, Serialize};

use crate::config::{Config, FileSpec, LogcollectorConfig, Start};
use crate::event::{Event, Kind, Receipt};
use crate::module::{Context, EventSink, Module};
use crate::status::{self, Stats};

pub const MODULE: Module = Module {
    name: "logcollector",
    section: "logcollector",
    state: "logcollector.json",
    enabled: |c| !c.logcollector.files.is_empty(),
    run,
};

/// Bytes read from one file per poll, so one busy file cannot starve the others; small enough that
/// the read and its events stay a fraction of the memory budget (4 MiB reads peaked at 20 MiB RSS in
/// `make bench`). A file with more to read is polled again at once.
const READ_PER_POLL: u64 = 256 << 10;
/// Bytes at the start of a file that identify it across restarts.
const FINGERPRINT_BYTES: usize = 256;
/// Events per chunk handed to the batcher.
const CHUNK: usize = 512;
/// Bytes of one file read but not yet acknowledged: eight reads, which as events (about twice the
/// bytes) keep both uploaders busy with 1 MB batches, while a stalled server stops the reading.
const IN_FLIGHT: u64 = 8 * READ_PER_POLL;
/// How long a rotated-away file is still read after its end: the writer may not have reopened
/// its log yet (Fluent Bit's `rotate_wait` is 5 s too).
const ROTATE_WAIT: Duration = Duration::from_secs(5);
/// Offsets are written at most this often (an fsync each time): a crash resends at most this much more.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Files followed at once. `logcollector.files` may come from the server (SPEC §2.1): a glob
/// like `/**/*` would otherwise hold one descriptor per match and exhaust the process limit.
const MAX_FOLLOWED: usize = 256;
/// How long a chunk waits for the pipeline before it is held and the files are looked at again.
const SEND_WAIT: Duration = Duration::from_millis(100);
/// Bytes of `logcollector.json` read at a start: what the agent writes (followed, rotated and
/// configured names, each at most a 4 KiB path) stays far below.
const MAX_STATE: u64 = 4 << 20;

/// What is saved per followed path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
    pub fp_len: usize,
    pub fp_crc: u32,
    /// Set for a file rotated away from this configured path, saved under its name then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
}

impl Saved {
    /// Whether `file` (`m`) is still the saved file: the same inode, long enough, and starting with the same bytes.
    fn is(&self, file: &File, m: &Metadata) -> bool {
        id(m) == (self.dev, self.ino)
            && self.offset <= m.len()
            && fingerprint(file, self.fp_len).is_ok_and(|fp| fp == (self.fp_len, self.fp_crc))
    }
}

/// Calls `f` with each complete non-empty line of `buf` (no `\n`, nor a `\r` before it) and the offset past it (pure).
/// Returns the bytes consumed (the rest is an unfinished line), or `None` as soon as `f` returns false.
pub fn for_each_line(buf: &[u8], mut f: impl FnMut(&[u8], usize) -> bool) -> Option<usize> {
    let mut start = 0;
    while let Some(i) = buf[start..].iter().position(|b| *b == b'\n') {
        let line = &buf[start..start + i];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.is_empty() && !f(line, start + i + 1) {
            return None;
        }
        start += i + 1;
    }
    Some(start)
}

/// The event for one line (pure); the path (as JSON) and the time (RFC 3339) are rendered once per poll.
fn line_event(path_json: &str, created: &str, line: &[u8], max: usize) -> Event {
    const HEADER: &str = r#"{"module":"logcollector","collector":"file"}"#;
    let text = String::from_utf8_lossy(line);
    let cut = (0..=max.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let tags = if cut < text.len() { r#","tags":["truncated"]"# } else { "" };
    // Written once into the event's own buffer: a line of control characters is six times
    // longer as JSON, and each copy of it would count in the peak memory.
    let mut lines = format!(r#"{HEADER}{}{{"event":{{"created":"{created}","original":"#, '\n').into_bytes();
    // Serialising a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut lines, &text[..cut]);
    lines.extend_from_slice(format!(r#"}},"log":{{"file":{{"path":{path_json}}}}}{tags}}}"#).as_bytes());
    // Every part is UTF-8: the lossy path never runs.
    let lines = String::from_utf8(lines).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    Event::from_lines(Kind::Stateless, lines, HEADER.len())
}

/// The length and CRC-32 of the file's first `len` bytes (fewer if it is shorter).
fn fingerprint(mut file: &File, len: usize) -> std::io::Result<(usize, u32)> {
    let mut buf = Vec::with_capacity(len);
    file.seek(SeekFrom::Start(0))?;
    file.take(len as u64).read_to_end(&mut buf)?;
    Ok((buf.len(), crc32fast::hash(&buf)))
}

/// What identifies a file while it exists: its device and inode.
type Id = (u64, u64);

fn id(m: &Metadata) -> Id {
    (m.dev(), m.ino())
}

/// `path` opened without following a link, if it is still the regular file `want`.
fn open_as(path: &Path, want: Id) -> Option<(File, Metadata)> {
    let file = crate::fsutil::open_nofollow(File::options().read(true), path).ok()?;
    let m = file.metadata().ok().filter(|m| m.is_file() && id(m) == want)?;
    Some((file, m))
}

/// The entries of `dir` with their own metadata (lstat: a link is no regular file and has an inode of its own).
fn entries(dir: &Path) -> impl Iterator<Item = (Metadata, PathBuf)> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| Some((e.metadata().ok()?, e.path())))
}

/// Hands `chunk` to the pipeline within [`SEND_WAIT`]: the chunk back if the pipeline is full, `None` once it is gone.
fn hand_over(sink: &EventSink, stats: &Stats, chunk: Vec<Event>) -> Option<Option<Vec<Event>>> {
    let n = chunk.len() as u64;
    let left = sink.send_within(chunk, SEND_WAIT).ok()?;
    if left.is_none() {
        Stats::add(&stats.received, n);
    }
    Some(left)
}

/// A file read as `path`: followed under that name, or rotated away from it (renamed, deleted, or no longer
/// matched), then finished before the next file under `path` (README, "Logcollector"; [`ROTATE_WAIT`]).
struct Followed {
    path: String,
    /// When it was rotated away from `path`.
    rotated: Option<Instant>,
    file: File,
    id: Id,
    /// Where the next read starts: the start of an unfinished line, which is read again
    /// rather than kept in memory (a 512 KiB line in each of 256 files would be 128 MiB).
    offset: u64,
    /// The reads in the pipeline, oldest first, with the offset after each.
    in_flight: VecDeque<(Arc<Receipt>, u64)>,
    /// The offset up to which the server took every line: what is saved.
    acked: u64,
    /// Length and CRC-32 of the first bytes as last seen: a file truncated and written again past
    /// `offset` before a poll saw it shrink (a reader held back by an outage) starts with other bytes.
    fp: (usize, u32),
}

impl Followed {
    fn new(path: String, file: File, id: Id, offset: u64, fp: (usize, u32)) -> Followed {
        Followed { path, rotated: None, file, id, offset, in_flight: VecDeque::new(), acked: offset, fp }
    }

    /// Moves `acked` past the settled reads; true while some read is neither settled nor
    /// abandoned (lost with the pipeline at shutdown: read again at the next start).
    fn advance(&mut self) -> bool {
        while let Some((r, offset)) = self.in_flight.front() {
            if !r.settled() {
                return !Receipt::abandoned(r);
            }
            self.acked = *offset;
            self.in_flight.pop_front();
        }
        false
    }

    fn saved(&self, rotated_from: Option<String>) -> Saved {
        let (fp_len, fp_crc) = fingerprint(&self.file, FINGERPRINT_BYTES).unwrap_or((0, 0));
        Saved { dev: self.id.0, ino: self.id.1, offset: self.acked, fp_len, fp_crc, rotated_from }
    }
}

/// The copy of `f` that copytruncate left in its directory: a regular file
/// other than `f`, at least as long as what was read of `f`, that starts with the bytes `f`
/// started with (`fp`, not empty); the last written of them. Never through a link.
fn find_copy(f: &Followed, fp: (usize, u32)) -> Option<(File, Id, String)> {
    if fp.0 == 0 {
        return None;
    }
    let long = |m: &Metadata| m.is_file() && id(m) != f.id && m.len() >= f.offset && m.len() >= fp.0 as u64;
    let copies = entries(Path::new(&f.path).parent()?).filter(|(m, _)| long(m)).filter_map(|(m, p)| {
        let (file, _) = open_as(&p, id(&m))?;
        fingerprint(&file, fp.0).is_ok_and(|c| c == fp).then(|| (Reverse(m.modified().ok()), file, id(&m), p))
    });
    // The first of the last written.
    let (_, file, id, name) = copies.min_by_key(|c| c.0)?;
    Some((file, id, name.to_string_lossy().into_owned()))
}

/// The file saved as `name` (`s`): under that name if it is still the same file, else under
/// another name in the same directory (renamed again by a rotation). Never through a link. The
/// directories scanned are kept in `dirs`, each scanned once.
fn find_saved(name: &str, s: &Saved, dirs: &mut HashMap<PathBuf, HashMap<Id, PathBuf>>) -> Option<(File, String)> {
    let check = |p: &Path| {
        let (file, m) = open_as(p, (s.dev, s.ino))?;
        s.is(&file, &m).then(|| (file, p.to_string_lossy().into_owned()))
    };
    check(Path::new(name)).or_else(|| {
        let dir = Path::new(name).parent()?;
        let ids = dirs.entry(dir.to_path_buf()).or_insert_with(|| entries(dir).map(|(m, p)| (id(&m), p)).collect());
        check(ids.get(&(s.dev, s.ino))?)
    })
}

/// The saved offsets; none (warned) if the file is damaged, not a regular file or larger than
/// [`MAX_STATE`]: the agent's account can write it, and a huge one would be read whole.
fn read_state(path: &Path) -> BTreeMap<String, Saved> {
    let mut text = Vec::new();
    let read = crate::fsutil::open_nofollow(File::options().read(true), path)
        .and_then(|f| f.take(MAX_STATE + 1).read_to_end(&mut text));
    let why = match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => e.to_string(),
        Ok(n) if n as u64 > MAX_STATE => format!("larger than {MAX_STATE} bytes"),
        Ok(_) => match serde_json::from_slice(&text) {
            Ok(saved) => return saved,
            Err(e) => e.to_string(),
        },
    };
    log::warn!("logcollector: ignoring the saved offsets in {} ({why})", path.display());
    BTreeMap::new()
}

#[derive(Default)]
pub struct Collector {
    config: LogcollectorConfig,
    state_path: PathBuf,
    saved: BTreeMap<String, Saved>,
    /// The followed files, and the rotated ones in the order they were rotated away.
    files: Vec<Followed>,
    /// A chunk the full pipeline did not take; handed over first at the next poll.
    held: Option<Vec<Event>>,
    /// Copies of truncated files found during a poll, joined to the rotated files after it.
    copies: Vec<Followed>,
    /// Paths warned about (unreadable), so a warning is not repeated every poll.
    warned: HashMap<String, String>,
    /// A file had more to read than one poll takes: poll again without waiting.
    more: bool,
    /// More files matched than `MAX_FOLLOWED` (warned once, until they fit again).
    capped: bool,
    /// The first poll is done: a file new since is read from its start, whatever `start` says.
    scanned: bool,
    last_save: Option<Instant>,
    stats: Arc<Stats>,
}

impl Collector {
    pub fn new(config: LogcollectorConfig, state_path: PathBuf, stats: Arc<Stats>) -> Collector {
        let saved = read_state(&state_path);
        let mut c = Collector { config, state_path, saved, stats, ..Collector::default() };
        c.resume_rotated();
        c
    }

    /// Finds the files rotated away before a restart and not delivered (README, "Logcollector", [`find_saved`]),
    /// to finish first, oldest (by last write) first, at most [`MAX_FOLLOWED`] of them.
    fn resume_rotated(&mut self) {
        let since = Instant::now();
        let mut dirs = HashMap::new();
        for (name, s) in &self.saved {
            // Still under its name (open() goes on there), or empty when saved (nothing identifies it).
            let here = || s.fp_len == 0 || std::fs::metadata(name).is_ok_and(|m| id(&m) == (s.dev, s.ino));
            if s.rotated_from.is_none() && here() {
                continue;
            }
            if self.files.len() >= MAX_FOLLOWED {
                log::warn!("logcollector: more than {MAX_FOLLOWED} rotated files to finish; the rest are skipped");
                break;
            }
            let Some((file, now)) = find_saved(name, s, &mut dirs) else { continue };
            let path = s.rotated_from.clone().unwrap_or_else(|| name.clone());
            log::info!("logcollector: finishing {now}, rotated away from {path} before the agent stopped");
            let file = Followed::new(path, file, (s.dev, s.ino), s.offset, (s.fp_len, s.fp_crc));
            self.files.push(Followed { rotated: Some(since), ..file });
        }
        // Stable: equal times keep the order of the names.
        self.files.sort_by_cached_key(|f| f.file.metadata().and_then(|m| m.modified()).ok());
    }

    /// Gives up on `path` until the next poll, warning once per reason.
    fn skip<T>(&mut self, path: &str, why: String) -> Option<T> {
        if self.warned.get(path) != Some(&why) {
            log::warn!("logcollector: {path}: {why}; retrying");
            self.warned.insert(path.to_string(), why);
        }
        None
    }

    /// Opens `path` if it is not followed (or rotated): decides where to start.
    fn open(&mut self, path: &str) -> Option<Followed> {
        // Non-blocking: opening a FIFO would otherwise wait for a writer. Only regular files
        // are read, so the flag changes nothing else.
        let file = match File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return self.skip(path, format!("cannot open ({e})")),
        };
        let meta = file.metadata().ok()?;
        if !meta.is_file() {
            return self.skip(path, "not a regular file".into());
        }
        self.warned.remove(path);
        // Saved offsets always win, if the file is still the same one; else the offset saved under
        // another name, for a file renamed (rotated) while the agent was away, to a name a pattern matches.
        let mut saved = self.saved.get(path).into_iter().chain(self.saved.values());
        // `start` of the first entry that matches `path`, else `logcollector.start`.
        let matches =
            |f: &&FileSpec| f.pattern == path || glob::Pattern::new(&f.pattern).is_ok_and(|p| p.matches(path));
        let start = || self.config.files.iter().find(matches).and_then(|f| f.start).unwrap_or(self.config.start);
        let offset = match saved.find(|s| s.is(&file, &meta)) {
            Some(s) => s.offset,
            // A file seen before under this path was replaced while the agent was away: all of it is new.
            None if !self.saved.contains_key(path) && !self.scanned && start() == Start::End => meta.len(),
            None => 0,
        };
        let fp = fingerprint(&file, FINGERPRINT_BYTES).unwrap_or((0, 0));
        Some(Followed::new(path.to_string(), file, id(&meta), offset, fp))
    }

    /// Reads what is new in file `i`; `Some(at_end)`, `None` if the pipeline is gone. Sets `more` when
    /// the file has more than one read holds. A rotated file's unfinished last line is sent as it is.
    fn read(&mut self, i: usize, sink: &EventSink) -> Option<bool> {
        let Collector { files, held, copies, more, stats, .. } = self;
        let (f, max) = (&mut files[i], self.config.max_line_bytes);
        let rotated = f.rotated.is_some();
        let Ok(len) = f.file.metadata().map(|m| m.len()) else { return Some(true) };
        f.advance();
        let before = f.fp;
        // Shrunk, or starts with other bytes: truncated (and maybe written again since). Checked
        // before the limit below, which can hold the reader back for as long as an outage lasts.
        let truncated = len < f.offset || fingerprint(&f.file, f.fp.0).is_ok_and(|fp| fp != f.fp);
        if f.fp.0 < FINGERPRINT_BYTES || truncated {
            f.fp = fingerprint(&f.file, FINGERPRINT_BYTES).unwrap_or(f.fp);
        }
        // copytruncate: what was not read (or not acknowledged) yet is in the copy, which
        // takes over this file's reads in flight and is finished first, like a rotated file.
        if let Some((file, id, name)) = (truncated && !rotated).then(|| find_copy(f, before)).flatten() {
            log::info!("logcollector: {} was truncated; finishing its copy {name} first", f.path);
            let in_flight = std::mem::take(&mut f.in_flight);
            let copy =
                Followed { in_flight, acked: f.acked, ..Followed::new(f.path.clone(), file, id, f.offset, before) };
            copies.push(copy);
            (f.offset, f.acked) = (0, 0);
            return Some(false);
        }
        if truncated {
            // What is in flight was before the truncation: its acknowledgement means offset 0 now.
            log::info!("logcollector: {} was truncated; reading it again from the start", f.path);
            f.in_flight.iter_mut().for_each(|(_, offset)| *offset = 0);
            (f.offset, f.acked) = (0, 0);
        } else if f.offset.saturating_sub(f.acked) >= IN_FLIGHT {
            // Enough of this file waits for the server: read on once some of it is acknowledged.
            return Some(false);
        }
        if held.is_some() || len <= f.offset {
            return Some(held.is_none());
        }
        // Room for the longest line, so an unfinished one is always cut or completed.
        let want = (len - f.offset).min(READ_PER_POLL.max(max as u64 + 2));
        *more |= len - f.offset > want;
        let mut buf = Vec::with_capacity(want as usize);
        if f.file.seek(SeekFrom::Start(f.offset)).is_err() || (&mut f.file).take(want).read_to_end(&mut buf).is_err() {
            return Some(false);
        }
        let receipt = sink.receipt();
        // Serialising a str cannot fail.
        let (path_json, created) =
            (serde_json::to_string(&f.path).unwrap_or_default(), status::rfc3339(SystemTime::now()));
        // Events go out in chunks as they are made: bounded memory, early backpressure. An empty line makes no
        // event; `emit(None)` hands over what is left. `None`: the pipeline is gone; `Some(false)`: it is full,
        // the chunk is held and the read ends after its last line (ARCHITECTURE.md, Delivery receipts).
        let mut chunk: Vec<Event> = Vec::with_capacity(CHUNK);
        let mut emit = |line: Option<&[u8]>| -> Option<bool> {
            let event = |l: &[u8]| line_event(&path_json, &created, l, max).tracked(&receipt);
            chunk.extend(line.filter(|l| !l.is_empty()).map(event));
            if chunk.is_empty() || (line.is_some() && chunk.len() < CHUNK) {
                return Some(true);
            }
            let left = hand_over(sink, stats, std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)))?;
            *more |= left.is_some();
            *held = left;
            Some(held.is_none())
        };
        let mut held_at = None;
        let used = for_each_line(&buf, |line, end| {
            let sent = emit(Some(line));
            held_at = (sent == Some(false)).then_some(end);
            sent == Some(true)
        });
        let mut used = used.or(held_at)?;
        // An unfinished line longer than the limit cannot wait for ever.
        if held_at.is_none() && (buf.len() - used > max || (rotated && f.offset + buf.len() as u64 >= len)) {
            emit(Some(&buf[used..]))?;
            used = buf.len();
        }
        emit(None)?;
        receipt.close();
        f.offset += used as u64;
        f.in_flight.push_back((receipt, f.offset));
        f.advance();
        Some(f.offset >= len)
    }

    /// One poll of every file, sending through `sink`; `None` once the pipeline is gone (shutdown).
    pub fn poll(&mut self, sink: &EventSink) -> Option<()> {
        self.more = false;
        // The configured paths, and the regular files the globs match.
        let found = |p: &str| glob::glob(p).into_iter().flatten().flatten().filter(|p| p.is_file()).collect();
        let paths = self.config.files.iter().map(|f| &f.pattern);
        let paths = paths.flat_map(|p| if p.contains(['*', '?', '[']) { found(p) } else { vec![PathBuf::from(p)] });
        let paths: BTreeSet<String> = paths.map(|p| p.to_string_lossy().into_owned()).collect();
        let now = Instant::now();
        // A path that names another file now (rotation) or nothing (deletion), or that no
        // pattern matches any more: its file is rotated away.
        let named = |f: &Followed| paths.contains(&f.path) && std::fs::metadata(&f.path).is_ok_and(|m| id(&m) == f.id);
        let (gone, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.files).into_iter().partition(|f| f.rotated.is_none() && !named(f));
        self.files = kept.into_iter().chain(gone.into_iter().map(|f| Followed { rotated: Some(now), ..f })).collect();
        let mut skipped = false;
        // A set: a glob may match thousands of names, each looked up every poll.
        let followed: HashSet<String> =
            self.files.iter().filter(|f| f.rotated.is_none()).map(|f| f.path.clone()).collect();
        let rotated = self.files.iter().any(|f| f.rotated.is_some());
        for path in paths.iter().filter(|p| !followed.contains(*p)) {
            // A rotated file renamed to a name the patterns match too (a rotation under a glob): the
            // same file, followed on under its new name, not read again.
            if rotated
                && let Ok(m) = std::fs::metadata(path)
                && let Some(f) = self.files.iter_mut().find(|f| f.rotated.is_some() && f.id == id(&m))
            {
                (f.path, f.rotated) = (path.to_string(), None);
                continue;
            }
            let opened = (self.files.len() < MAX_FOLLOWED).then(|| self.open(path));
            skipped |= opened.is_none();
            self.files.extend(opened.flatten());
        }
        if skipped && !self.capped {
            log::warn!("logcollector: {} files match; following only {MAX_FOLLOWED} at once", paths.len());
        }
        self.capped = skipped;
        // Files opened from here on were rotated in while the agent ran: all of them is new.
        self.scanned = true;
        if let Some(chunk) = self.held.take() {
            self.held = hand_over(sink, &self.stats, chunk)?;
        }
        // Rotated files first, oldest first; a path's next file waits until the one before it is
        // read to its end and delivered, so a file's lines never overtake the rest of the last one.
        let mut waiting = BTreeSet::new();
        for i in 0..self.files.len() {
            // Followed files wait; a rotated one waits while an older file of its name is not finished.
            if self.files[i].rotated.is_none() || waiting.contains(&self.files[i].path) {
                continue;
            }
            if !(self.read(i, sink)? && !self.files[i].advance() && self.files[i].in_flight.is_empty()) {
                waiting.insert(self.files[i].path.clone());
            }
        }
        self.files.retain(|f| f.rotated.is_none_or(|since| waiting.contains(&f.path) || since.elapsed() < ROTATE_WAIT));
        for i in 0..self.files.len() {
            if self.files[i].rotated.is_none() && !waiting.contains(&self.files[i].path) {
                self.read(i, sink)?;
            }
        }
        for copy in std::mem::take(&mut self.copies) {
            // A copy a pattern matches too is followed already: it goes on from the unread rest
            // if nothing of it was read yet, else as it is (its lines are sent again).
            match self.files.iter_mut().find(|o| o.rotated.is_none() && o.id == copy.id) {
                Some(o) if o.offset == 0 && o.in_flight.is_empty() => *o = Followed { path: o.path.clone(), ..copy },
                Some(_) => {}
                None => self.files.push(Followed { rotated: Some(now), ..copy }),
            }
        }
        if self.last_save.is_none_or(|t| t.elapsed() >= SAVE_EVERY) {
            self.save();
        }
        Some(())
    }

    /// Writes the offsets if they changed (atomically): of the followed files, a mark for each configured name
    /// whose file is gone (a new file there is read from its start), each undelivered rotated file by its name now.
    pub fn save(&mut self) {
        self.last_save = Some(Instant::now());
        let files = &self.config.files;
        let literal = |p: &String| files.iter().any(|f| f.pattern == *p);
        let followed = |p: &str| self.files.iter().any(|f| f.rotated.is_none() && f.path == p);
        self.saved.retain(|p, s| s.rotated_from.is_none() && (followed(p) || literal(p)));
        // Only past what the server took (ARCHITECTURE.md, Delivery receipts).
        for f in &self.files {
            if f.rotated.is_none() {
                if self.saved.get(&f.path).is_none_or(|s| ((s.dev, s.ino), s.offset) != (f.id, f.acked)) {
                    self.saved.insert(f.path.clone(), f.saved(None));
                }
                continue;
            }
            let delivered = f.acked >= f.file.metadata().map_or(0, |m| m.len());
            // Saved under the name it has now (it may have been renamed since it was opened); none once deleted.
            let name = std::fs::read_link(format!("/proc/self/fd/{}", f.file.as_raw_fd())).ok();
            let name = name.and_then(|n| n.to_str().filter(|n| !n.ends_with(" (deleted)")).map(str::to_string));
            if let Some(name) = name.filter(|n| !delivered && !followed(n)) {
                self.saved.insert(name, f.saved(Some(f.path.clone())));
            }
        }
        let Ok(json) = serde_json::to_vec(&self.saved) else { return };
        // Compared with at most as much as is written: the file found at the start may be huge.
        let mut old = Vec::new();
        let read = File::open(&self.state_path).and_then(|f| f.take(json.len() as u64 + 1).read_to_end(&mut old));
        if read.is_ok() && old == json {
            return;
        }
        if let Err(e) = crate::fsutil::write_atomic(&self.state_path, &json, 0o600) {
            log::error!("logcollector: cannot save offsets to {}: {e}", self.state_path.display());
        }
    }
}

/// The logcollector thread: polls until `stop` closes, then saves its offsets.
fn run(config: Config, ctx: Context) {
    let mut c = Collector::new(config.logcollector, ctx.state, ctx.stats);
    let interval = c.config.poll_interval;
    let patterns: Vec<&str> = c.config.files.iter().map(|f| f.pattern.as_str()).collect();
    log::info!("logcollector: following {}", patterns.join(", "));
    while c.poll(&ctx.events).is_some() {
        if c.more {
            // A file is behind: catch up at once (the pipeline's backpressure still applies).
            continue;
        }
        select! {
            recv(ctx.stop) -> _ => break,
            // Acknowledged lines: offsets move, and a file held back by `IN_FLIGHT` reads on.
            recv(ctx.events.settled()) -> _ => {}
            default(interval) => {}
        }
    }
    // The supervisor stops the modules before the pipeline drains (within its 5 s grace): waiting 10 s covers
    // the drain, after which every read is settled or abandoned (a held chunk is abandoned here: its lines are
    // read again at the next start), so the offsets saved include what the drain delivered.
    drop(c.held.take());
    let until = Instant::now() + Duration::from_secs(10);
    // An abandoned read sends no wake-up: look again every 100 ms.
    while c.files.iter_mut().fold(false, |busy, f| f.advance() | busy) && Instant::now() < until {
        let _ = ctx.events.settled().recv_timeout(Duration::from_millis(100));
    }
    c.save();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn json_string(s: &str) -> String {
        serde_json::to_string(s).unwrap_or_default()
    }

    fn split_lines(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let used = for_each_line(buf, |l, _| {
            out.push(l.to_vec());
            true
        })
        .unwrap();
        buf.drain(..used);
        out
    }

    #[test]
    fn line_splitting() {
        // (input, complete lines, what stays buffered)
        type Case<'a> = (&'a [u8], &'a [&'a [u8]], &'a [u8]);
        let table: &[Case] = &[
            (b"a\nb\n", &[b"a", b"b"], b""),
            (b"a\r\nb", &[b"a"], b"b"),
            (b"\n\n\r\nx\n", &[b"x"], b""),
            (b"no newline", &[], b"no newline"),
            (b"a\rb\n", &[b"a\rb"], b""),
        ];
        for (input, lines, rest) in table {
            let mut buf = input.to_vec();
            let got = split_lines(&mut buf);
            assert_eq!(got, lines.iter().map(|l| l.to_vec()).collect::<Vec<_>>(), "{input:?}");
            assert_eq!(buf, *rest, "{input:?}");
        }
    }

    #[test]
    fn events_follow_the_inventory_shape() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_795_705_200_123);
        let event = |path: &str, line: &[u8], max| line_event(&json_string(path), &status::rfc3339(t), line, max);
        let e = event("/var/log/auth.log", b"Accepted publickey \xff", 100);
        assert_eq!(e.header(), r#"{"module":"logcollector","collector":"file"}"#);
        let d: serde_json::Value = serde_json::from_str(e.data().unwrap()).unwrap();
        assert_eq!(d["event"]["original"], "Accepted publickey \u{fffd}");
        assert_eq!(d["event"]["created"], "2026-11-26T15:00:00.123Z");
        assert_eq!(d["log"]["file"]["path"], "/var/log/auth.log");
        assert!(d.get("tags").is_none());
        let long = event("/x", "é".repeat(100).as_bytes(), 11);
        let d: serde_json::Value = serde_json::from_str(long.data().unwrap()).unwrap();
        assert_eq!(d["event"]["original"], "ééééé");
        assert_eq!(d["tags"], serde_json::json!(["truncated"]));
    }
}
