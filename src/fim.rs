//! File integrity monitoring (docs/events.md): documents from a merge-join of a sorted walk with the sorted snapshot
//! `fim.snapshot`, which streams (memory does not grow with the files). Full scans every `fim.interval`; inotify marks
//! paths dirty under `realtime` paths, and their ranges alone are walked again, once per path per `COALESCE`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{TryRecvError::Disconnected, select};
use serde_json::{Value, json};

use crate::config::{Config, FimConfig, FimPath};
use crate::event::{Event, Kind};
use crate::fsutil::{fd_path, handle, open_path};
use crate::inventory::{Change, ScanError, Stored, deliver, doc_id, merge_join};
use crate::module::{Context, Module, SinkError};

pub const MODULE: Module = Module {
    name: "fim",
    section: "fim",
    state: "fim.snapshot",
    enabled: |c| c.fim.enabled && !c.fim.paths.is_empty(),
    run,
};

/// A burst of writes to a path is one change: it is walked again this long after it was first reported.
const COALESCE: Duration = Duration::from_secs(1);
/// Bounds: dirty paths (past it: a full scan, as after an overflow), names a walk holds at once (the rest of a
/// directory is counted, not monitored), path bytes.
const DIRTY_MAX: usize = 4096;
const NAMES_MAX: usize = 65_536;
const PATH_MAX: usize = 4096;
/// Bytes of watched directories' paths held (an account can make 100 000 directories of 4 KiB paths in a realtime tree).
const WATCHED_BYTES: usize = 4 << 20;
/// What a watched directory reports: changes of its entries and of itself; ONLYDIR: never a link's target.
const MASK: u32 = libc::IN_ALL_EVENTS & !(libc::IN_ACCESS | libc::IN_OPEN | libc::IN_CLOSE_NOWRITE)
    | libc::IN_ONLYDIR
    | libc::IN_EXCL_UNLINK;

/// The events in `buf` as inotify(7) lays them out, `(wd, mask, name)` (pure); a truncated tail is dropped.
fn parse_events(buf: &[u8]) -> Vec<(i32, u32, OsString)> {
    let (mut out, mut at) = (Vec::new(), 0);
    while let Some(h) = buf.get(at..at + 16) {
        let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let Some(name) = buf.get(at + 16..at + 16 + word(12) as usize) else { break };
        // NUL-padded to an alignment.
        let text = OsString::from_vec(name.split(|b| *b == 0).next().unwrap_or_default().into());
        out.push((word(0) as i32, word(4), text));
        at += 16 + name.len();
    }
    out
}

/// Paths reported changed, each with when it was first (pure: `now` is passed in). False: the set is full.
fn touch(dirty: &mut BTreeMap<PathBuf, Instant>, path: PathBuf, now: Instant) -> bool {
    if dirty.len() >= DIRTY_MAX && !dirty.contains_key(&path) {
        return false;
    }
    dirty.entry(path).or_insert(now);
    true
}

/// The paths whose window has ended, taken out (pure): sorted, none beneath another (its walk covers them).
fn due(dirty: &mut BTreeMap<PathBuf, Instant>, now: Instant) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    dirty.retain(|p, t| {
        let due = now >= *t + COALESCE;
        let _ = (due && !out.last().is_some_and(|l| p.starts_with(l))).then(|| out.push(p.clone()));
        !due
    });
    out
}

/// `fim.max_eps` (pure): a chunk of `n` changes may go at the instant returned, the next one `n / eps` s later.
fn pace(next: &mut Option<Instant>, now: Instant, n: usize, eps: usize) -> Instant {
    let at = next.map_or(now, |t| t.max(now));
    *next = Some(at + Duration::from_secs_f64(n as f64 / eps.max(1) as f64));
    at
}

/// Whether `path` is one of `set` (sorted, none beneath another) or beneath one (pure).
fn under(set: &[PathBuf], path: &Path) -> bool {
    let i = set.partition_point(|d| d.as_path() <= path);
    i > 0 && path.starts_with(&set[i - 1])
}

/// The most specific configured path holding `path`, and how many levels below it `path` is.
fn settings<'c>(cfg: &'c FimConfig, path: &Path) -> Option<(&'c FimPath, usize)> {
    let set = cfg.paths.iter().filter(|p| path.starts_with(&p.path)).max_by_key(|p| p.path.components().count())?;
    Some((set, path.components().count() - set.path.components().count()))
}

/// The fields that differ, as `file.<field>` (`file.hash.<algorithm>`), and their old values (pure).
fn changed(old: &Value, new: &Value, prefix: &str) -> (Vec<String>, Value) {
    let (mut fields, mut previous) = (Vec::new(), json!({}));
    let keys: std::collections::BTreeSet<&String> =
        [old, new].iter().filter_map(|v| v.as_object()).flatten().map(|e| e.0).collect();
    for k in keys.into_iter().map(String::as_str).filter(|k| old[k] != new[k]) {
        let (f, p) = match old[k].is_object() || new[k].is_object() {
            true => changed(&old[k], &new[k], &format!("{prefix}{k}.")),
            false => (vec![format!("{prefix}{k}")], old[k].clone()),
        };
        (fields.extend(f), previous[k] = p).1
    }
    (fields, previous)
}

/// The stateless notification of a change (pure): Wazuh's `event.type`, `changed_fields` and `file.previous`.
fn notification(c: &Change, now: &str) -> Event {
    let file = |s: &Stored| serde_json::from_str::<Value>(&s.doc).map(|mut v| v["file"].take()).unwrap_or_default();
    let (kind, mut f, fields) = match c {
        Change::Create { new, .. } => ("added", file(new), Vec::new()),
        Change::Delete { old, .. } => ("deleted", file(old), Vec::new()),
        Change::Update { old, new, .. } => {
            let (old, mut new) = (file(old), file(new));
            let (fields, previous) = changed(&old, &new, "file.");
            new["previous"] = previous;
            ("modified", new, fields)
        }
    };
    let reason = format!("File {} was {kind}", f["path"].as_str().unwrap_or("?"));
    let data =
        json!({"event": {"changed_fields": fields, "created": now, "reason": reason, "type": kind}, "file": f.take()});
    Event::new(Kind::Stateless, r#"{"collector":"file","module":"fim"}"#, Some(&data.to_string()))
}

/// The documents of a snapshot in order, a line each: `<path as a JSON string>\t<document>` (only the path is parsed).
/// A line that is not one, or out of order, ends them, named in `bad`.
struct Snapshot {
    lines: std::iter::Take<io::Split<BufReader<File>>>,
    last: Option<PathBuf>,
    at: (String, usize),
    bad: Rc<RefCell<Option<String>>>,
}

impl Iterator for Snapshot {
    type Item = (PathBuf, Stored);

    fn next(&mut self) -> Option<(PathBuf, Stored)> {
        let mut line = MARK.as_bytes().to_vec();
        while line == MARK.as_bytes() {
            (line, self.at.1) = (self.lines.next()?.unwrap_or_default(), self.at.1 + 1);
        }
        let line = String::from_utf8(line).ok();
        let split = line.as_deref().and_then(|l| l.split_once('\t'));
        // The document is checked to be JSON (not parsed): garbage is never sent as an old value.
        let doc = |d: &str| serde_json::from_str::<&serde_json::value::RawValue>(d).ok().map(|d| d.get().to_string());
        let key = split.and_then(|(k, d)| Some((serde_json::from_str::<PathBuf>(k).ok()?, doc(d)?)));
        let found = key.filter(|(k, _)| self.last.as_ref().is_none_or(|last| last < k));
        if found.is_none() {
            *self.bad.borrow_mut() = Some(format!("{} line {} is not a document in order", self.at.0, self.at.1));
        }
        found.map(|(k, doc)| (self.last.insert(k).clone(), Stored { collector: "file".into(), doc }))
    }
}

/// A line of the snapshot being written once the changes up to it are durable: a scan cut short resumes from there.
const MARK: &str = r#"{"delivered":true}"#;

/// A scan cut short (a crash, a stop, a full queue) after some changes were durable left them in `tmp` up to its last
/// MARK: they, then the old snapshot's documents past them, become the snapshot. Else the next scan would compare with
/// a baseline that lacks them, and miss a change made meanwhile (a file created, delivered, then deleted).
fn resume(tmp: &Path, snapshot: &Path) -> io::Result<()> {
    let lines = |f: File, n: usize| BufReader::with_capacity(64 << 10, f).split(b'\n').take(n);
    let key = |l: &[u8]| serde_json::from_slice::<PathBuf>(l.split(|b| *b == b'\t').next().unwrap_or_default()).ok();
    let Ok(file) = File::open(tmp) else { return Ok(()) };
    // The lines up to the last mark, and the last path among them.
    let (mut n, mut upto, mut at) = (0, None, None);
    for (i, l) in lines(file, usize::MAX).enumerate().skip(1) {
        let l = l?;
        (n, upto, at) = if l == MARK.as_bytes() { (i + 1, at.clone(), at) } else { (n, upto, key(&l)) };
    }
    if n == 0 {
        return fs::remove_file(tmp);
    }
    let head = |l: Option<io::Result<Vec<u8>>>| {
        l.and_then(Result::ok).and_then(|l| serde_json::from_slice::<Value>(&l).ok()).unwrap_or_default()
    };
    let mut part = lines(File::open(tmp)?, n);
    let mut header = head(part.next());
    // Past the cut scan's documents, the old snapshot's, if it is sealed and this agent's; else that scan was a first
    // one, and the next is one past `upto` (no notifications there).
    let old =
        File::open(snapshot).ok().and_then(|f| sealed(&f)).and_then(|n| Some(lines(File::open(snapshot).ok()?, n)));
    let old = old.and_then(|mut o| (head(o.next())["uuid"] == header["uuid"]).then_some(o));
    if old.is_none() {
        header["upto"] = json!(upto);
    }
    let new = snapshot.with_extension("new");
    let _ = fs::remove_file(&new);
    let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&new)?;
    let mut out = Sealing(BufWriter::with_capacity(64 << 10, file), crc32fast::Hasher::new(), 0);
    out.line(format_args!("{header}"))?;
    for l in part {
        let l = l?;
        if l != MARK.as_bytes() {
            out.line(format_args!("{}", String::from_utf8_lossy(&l)))?;
        }
    }
    for l in old.into_iter().flatten() {
        let l = l?;
        if l != MARK.as_bytes() && key(&l) > upto {
            out.line(format_args!("{}", String::from_utf8_lossy(&l)))?;
        }
    }
    out.seal()?.sync_all()?;
    fs::rename(&new, snapshot)?;
    File::open(snapshot.parent().unwrap_or(Path::new("/")))?.sync_all()?;
    fs::remove_file(tmp)
}

/// The snapshot being written: each line is counted and summed, and the last, `{"crc32":…,"lines":…}`, seals them.
struct Sealing(BufWriter<File>, crc32fast::Hasher, usize);

impl Sealing {
    fn line(&mut self, text: std::fmt::Arguments) -> io::Result<()> {
        let line = format!("{text}\n");
        self.1.update(line.as_bytes());
        self.2 += 1;
        self.0.write_all(line.as_bytes())
    }

    fn seal(mut self) -> io::Result<File> {
        writeln!(self.0, "{}", json!({"crc32": self.1.clone().finalize(), "lines": self.2}))?;
        self.0.into_inner().map_err(|e| e.into_error())
    }
}

/// How many lines precede the last, if it seals them: a snapshot cut short or altered is found before it is used.
fn sealed(file: &File) -> Option<usize> {
    let (mut crc, mut n, mut last) = (crc32fast::Hasher::new(), 0, None::<Vec<u8>>);
    for line in BufReader::with_capacity(64 << 10, file).split(b'\n') {
        if let Some(before) = last.replace(line.ok()?) {
            crc.update(&before);
            crc.update(b"\n");
            n += 1;
        }
    }
    (serde_json::from_slice::<Value>(&last?).ok()? == json!({"crc32": crc.finalize(), "lines": n})).then_some(n)
}

/// The inotify instance, and the directory each watch is on; past the watch limit, no more until a full scan.
struct Watches {
    fd: File,
    dirs: HashMap<i32, PathBuf>,
    failed: usize,
    /// Of the paths in `dirs`.
    bytes: usize,
}

impl Watches {
    fn add(&mut self, dir: &File, path: &Path) {
        // Through /proc/self/fd: the directory the handle pins, whatever its path is now.
        let room = self.failed == 0 && self.bytes + path.as_os_str().len() <= WATCHED_BYTES;
        match room.then(|| crate::sys::add_watch(&self.fd, &fd_path(dir), MASK)) {
            Some(Ok(wd)) => {
                self.forget(wd);
                self.bytes += path.as_os_str().len();
                self.dirs.insert(wd, path.to_path_buf());
            }
            Some(Err(e)) if e.raw_os_error() != Some(libc::ENOSPC) => {} // gone meanwhile: its parent reports that
            _ => self.failed += 1,
        }
    }

    fn forget(&mut self, wd: i32) {
        self.bytes -= self.dirs.remove(&wd).map_or(0, |p| p.as_os_str().len());
    }
}

/// A directory being walked: handle, path, names left (last first), (device, inode).
type Level = (File, PathBuf, Vec<OsString>, (u64, u64));

/// A walk of the configured trees beneath `roots` in path order (names sorted per directory), following no link
/// unless `fim.follow_symlinks`: `(path, document)` for each file, symbolic link or other non-directory.
struct Walk<'a> {
    cfg: &'a FimConfig,
    ignore: Vec<(glob::Pattern, bool)>,
    watches: Option<&'a mut Watches>,
    roots: std::vec::IntoIter<PathBuf>,
    stack: Vec<Level>,
    buf: Vec<u8>,
    /// Files found, past max_files, without hashes (unreadable), skipped (not UTF-8, too long, too many).
    counts: [usize; 4],
    /// Directories that could not be listed: their old documents are kept.
    unreadable: Rc<RefCell<Vec<PathBuf>>>,
    /// Owner and group names by (is a group, id), looked up once a scan; bounded, as NSS may hold many.
    names: HashMap<(bool, u32), Option<String>>,
    /// `fim.max_read_rate`: when the next read may start (a throttled read waits on `stop`, which ends it).
    io: Option<Instant>,
    /// Closed at stop: the walk ends at the next name, a hash at the next buffer (a 1 TB file takes hours).
    stop: &'a crossbeam_channel::Receiver<()>,
    /// Directories entered through a followed link.
    linked: HashSet<(u64, u64)>,
}

impl Iterator for Walk<'_> {
    type Item = (PathBuf, Stored);

    fn next(&mut self) -> Option<(PathBuf, Stored)> {
        loop {
            if self.stop.try_recv() == Err(Disconnected) {
                return None;
            }
            let (path, at, _parent) = match self.stack.last_mut() {
                Some((dir, rel, names, _)) => match names.pop() {
                    Some(name) => (rel.join(&name), fd_path(dir).join(name), None),
                    None => {
                        self.stack.pop();
                        continue;
                    }
                },
                None => {
                    let path = self.roots.next()?;
                    let real = self.cfg.root.join(path.strip_prefix("/").unwrap_or(&path));
                    // The parent is walked as open_path walks (a link only where root alone can write).
                    let Ok(parent) = open_path(real.parent().unwrap_or(&real), false) else { continue };
                    let at = fd_path(&parent).join(real.file_name().unwrap_or_default());
                    // A file's own watch is lost when an editor renames a new one over it: its directory is watched.
                    let file = fs::symlink_metadata(&at).is_ok_and(|m| !m.is_dir());
                    let realtime = file && settings(self.cfg, &path).is_some_and(|(s, _)| s.realtime);
                    if let Some(w) = self.watches.as_deref_mut().filter(|_| realtime) {
                        w.add(&parent, path.parent().unwrap_or(&path));
                    }
                    (path, at, Some(parent))
                }
            };
            if let Some(found) = self.visit(path, &at) {
                return Some(found);
            }
        }
    }
}

impl<'a> Walk<'a> {
    /// A walk beneath `roots` (sorted, none beneath another) that leaves out `fim.ignore` and the path `own`.
    fn new(
        cfg: &'a FimConfig,
        roots: Vec<PathBuf>,
        own: Option<&Path>,
        watches: Option<&'a mut Watches>,
        stop: &'a crossbeam_channel::Receiver<()>,
    ) -> Walk<'a> {
        let own = own.and_then(|d| Some(glob::Pattern::escape(d.to_str()?)));
        let ignore = cfg.ignore.iter().chain(own.as_slice());
        Walk {
            cfg,
            ignore: ignore.filter_map(|g| Some((glob::Pattern::new(g).ok()?, g.contains('/')))).collect(),
            watches,
            roots: roots.into_iter(),
            stack: Vec::new(),
            buf: vec![0; 64 << 10],
            counts: [0; 4],
            unreadable: Rc::default(),
            names: HashMap::new(),
            io: None,
            stop,
            linked: HashSet::new(),
        }
    }
}

/// The configured paths, sorted, none beneath another: what a full scan walks.
fn roots(cfg: &FimConfig) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = cfg.paths.iter().map(|p| p.path.clone()).collect();
    roots.sort();
    (roots.dedup_by(|p, kept| p.starts_with(kept)), roots).1
}

impl Walk<'_> {
    fn visit(&mut self, path: PathBuf, at: &Path) -> Option<(PathBuf, Stored)> {
        let (cfg, set) = (self.cfg, settings(self.cfg, &path));
        let on_the_way = cfg.paths.iter().any(|p| p.path.starts_with(&path) && p.path != path);
        let name = Path::new(path.file_name().unwrap_or_default());
        let ignored = self.ignore.iter().any(|(g, whole)| g.matches_path_with(if *whole { &path } else { name }, GLOB));
        if !(on_the_way || set.is_some_and(|(s, level)| level <= s.depth + 1)) || ignored {
            return None;
        } else if path.to_str().is_none_or(|p| p.len() > PATH_MAX) {
            return (self.counts[3] += 1, None).1;
        }
        // A link followed to nothing is reported as the link.
        let m = match cfg.follow_symlinks {
            true => fs::metadata(at).or_else(|_| fs::symlink_metadata(at)).ok()?,
            false => fs::symlink_metadata(at).ok()?,
        };
        if m.is_dir() && (on_the_way || set.is_some_and(|(s, level)| level <= s.depth)) {
            self.enter(path, at, &m, set.is_some_and(|(s, _)| s.realtime));
        } else if !m.is_dir() && set.is_some() {
            self.counts[usize::from(self.counts[0] >= cfg.max_files)] += 1;
            return (self.counts[1] == 0)
                .then(|| (path.clone(), Stored { collector: "file".into(), doc: self.document(&path, at, &m) }));
        }
        None
    }

    fn enter(&mut self, path: PathBuf, at: &Path, m: &Metadata, realtime: bool) {
        let id = (m.dev(), m.ino());
        // A followed link up the tree would loop: a directory already on the way down is not entered again. One
        // reached through a link is entered once per scan (a lattice of links, 2^depth paths, would never end), and
        // past NAMES_MAX of them none is.
        let linked = self.cfg.follow_symlinks && fs::symlink_metadata(at).is_ok_and(|l| l.is_symlink());
        if self.stack.iter().any(|d| d.3 == id) || linked && (self.linked.len() >= NAMES_MAX || !self.linked.insert(id))
        {
            return;
        }
        let opened = match self.cfg.follow_symlinks {
            true => OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(at),
            false => handle(at),
        };
        let room = NAMES_MAX.saturating_sub(self.stack.iter().map(|d| d.2.len()).sum());
        let listed = opened.and_then(|dir| {
            // Watched before it is listed: what is created meanwhile is reported, not missed (inotify(7)).
            if let (true, Some(w)) = (realtime, self.watches.as_deref_mut()) {
                w.add(&dir, &path);
            }
            let mut entries = fs::read_dir(fd_path(&dir))?;
            let names = entries.by_ref().take(room).map(|e| e.map(|e| e.file_name())).collect::<io::Result<Vec<_>>>();
            Ok((dir, names?, entries.count()))
        });
        match listed {
            Ok((dir, mut names, over)) => {
                self.counts[3] += over;
                names.sort_by(|a, b| b.cmp(a));
                self.stack.push((dir, path, names, id));
            }
            Err(_) => self.unreadable.borrow_mut().push(path),
        }
    }

    /// The `wazuh-states-fim` document (docs/events.md).
    fn document(&mut self, path: &Path, at: &Path, m: &Metadata) -> String {
        let kind = if m.is_file() {
            "file"
        } else if m.is_symlink() {
            "symlink"
        } else {
            "other"
        };
        let mtime = crate::status::rfc3339(m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        let mut f = json!({"gid": m.gid().to_string(), "inode": m.ino().to_string(), "mode": format!("{:04o}", m.mode() & 0o7777),
            "mtime": mtime, "name": path.file_name().unwrap_or_default().to_string_lossy(), "path": path.to_string_lossy(),
            "size": m.size(), "type": kind, "uid": m.uid().to_string()});
        for (key, id, group) in [("owner", m.uid(), false), ("group", m.gid(), true)] {
            let _ = (self.names.len() >= 4096).then(|| self.names.clear());
            let name = self.names.entry((group, id)).or_insert_with(|| crate::sys::name_of(id, group));
            let _ = name.as_ref().map(|n| f[key] = n.as_str().into());
        }
        if m.is_symlink() {
            f["target_path"] = fs::read_link(at).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default().into();
        } else if m.is_file() && m.size() > self.cfg.max_file_bytes {
            f["attributes"] = json!(["unhashed"]);
        } else if m.is_file() && !self.cfg.hashes.is_empty() {
            match self.digest(at, m) {
                Ok(hash) => f["hash"] = hash,
                Err(_) => (self.counts[2] += 1, f["attributes"] = json!(["unreadable"])).1,
            }
        }
        json!({ "file": f }).to_string()
    }

    /// The chosen hashes of the file lstat saw at `at`, streamed through one buffer. Opened following no link and
    /// without blocking, then checked to be that same regular file: a FIFO or device swapped in is not read.
    fn digest(&mut self, at: &Path, m: &Metadata) -> io::Result<Value> {
        let nofollow = if self.cfg.follow_symlinks { 0 } else { libc::O_NOFOLLOW };
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | nofollow).open(at)?;
        let f = file.metadata()?;
        if !f.is_file() || (f.dev(), f.ino()) != (m.dev(), m.ino()) {
            return Err(io::Error::other("replaced while scanned"));
        }
        let on = ["md5", "sha1", "sha256"].map(|h| self.cfg.hashes.iter().any(|x| x == h));
        let (mut md5, mut sha1, mut sha256) =
            (md5::Context::new(), sha1_smol::Sha1::new(), ring::digest::Context::new(&ring::digest::SHA256));
        // A file that grows while it is read is hashed as far as lstat saw it.
        let mut file = file.take(m.size());
        let rate = usize::try_from(self.cfg.max_read_rate).unwrap_or(usize::MAX);
        while let n @ 1.. = file.read(&mut self.buf)? {
            if self.stop.try_recv() == Err(Disconnected) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let chunk = &self.buf[..n];
            let _ = (
                on[0].then(|| md5.consume(chunk)),
                on[1].then(|| sha1.update(chunk)),
                on[2].then(|| sha256.update(chunk)),
            );
            if rate > 0 {
                let now = Instant::now();
                pace(&mut self.io, now, n, rate);
                // Debts under a millisecond add up in `io` instead: no park per small file.
                let wait = self.io.map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
                let stopped = crossbeam_channel::RecvTimeoutError::Disconnected;
                if wait >= Duration::from_millis(1) && self.stop.recv_timeout(wait) == Err(stopped) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
            }
        }
        let sha256 = sha256.finish().as_ref().iter().map(|x| format!("{x:02x}")).collect::<String>();
        let all = [("md5", format!("{:x}", md5.finalize())), ("sha1", sha1.digest().to_string()), ("sha256", sha256)];
        Ok(all.into_iter().zip(on).filter(|(_, on)| *on).map(|((k, v), _)| (k.to_string(), Value::from(v))).collect())
    }
}

/// `fim.ignore`: `*` does not cross `/`, `**` does.
const GLOB: glob::MatchOptions =
    glob::MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: false };

/// Reconciles the snapshot with the disk beneath `scope` (sorted, none beneath another; `None`: a full scan). The
/// changes go out in chunks paced to `fim.max_eps`; the new snapshot replaces the old once all are durable. Returns a
/// line for the log; `None` when a partial scan has no baseline to amend. `warned`: max_files, watch limit, said once.
fn reconcile(
    cfg: &FimConfig,
    ctx: &Context,
    w: Option<&mut Watches>,
    (next, warned): (&mut Option<Instant>, &mut [bool; 3]),
    scope: Option<Vec<PathBuf>>,
) -> Result<Option<String>, ScanError> {
    let (started, snapshot, bad) = (Instant::now(), &ctx.state, Rc::new(RefCell::new(None)));
    let corrupt = |why: String| ScanError::Corrupt(format!("{}: {why}", snapshot.display()));
    let tmp = snapshot.with_extension("tmp");
    resume(&tmp, snapshot).map_err(|e| ScanError::Failed(format!("cannot resume from {}: {e}", tmp.display())))?;
    let old = match File::open(snapshot) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        opened => {
            let file = opened.map_err(|e| corrupt(e.to_string()))?;
            let why = "is cut short or altered (its last line does not seal the rest)";
            let n = sealed(&file).ok_or_else(|| ScanError::Corrupt(format!("{} {why}", snapshot.display())))?;
            (&file).seek(io::SeekFrom::Start(0)).map_err(|e| corrupt(e.to_string()))?;
            let mut lines = BufReader::with_capacity(64 << 10, file).split(b'\n').take(n);
            let header = lines.next().and_then(Result::ok).and_then(|l| serde_json::from_slice::<Value>(&l).ok());
            let header = header.ok_or_else(|| corrupt("no header line".into()))?;
            // Another agent's snapshot (a new registration) is no baseline: everything is sent again.
            (header["uuid"] == ctx.uuid.as_str()).then(|| {
                let at = (snapshot.display().to_string(), 1);
                let upto = serde_json::from_value::<PathBuf>(header["upto"].clone()).ok();
                (Snapshot { lines, last: None, at, bad: bad.clone() }, upto)
            })
        }
    };
    // A first scan resumed (see `resume`) is still a first one past `upto`.
    let (first, full, upto) = (old.is_none(), scope.is_none(), old.as_ref().and_then(|o| o.1.clone()));
    let old = old.map(|o| o.0);
    if first && !full {
        return Ok(None);
    }
    let save = |e: io::Error| ScanError::Failed(format!("cannot write {}: {e}", tmp.display()));
    let _ = fs::remove_file(&tmp);
    let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(save)?;
    let mut out = Sealing(BufWriter::with_capacity(64 << 10, file), crc32fast::Hasher::new(), 0);
    // A partial scan keeps `upto`: only a full one sees the files past it.
    out.line(format_args!("{}", json!({"uuid": ctx.uuid, "upto": upto.as_ref().filter(|_| !full)}))).map_err(save)?;
    let scope = scope.unwrap_or_else(|| roots(cfg));
    // The agent's own data directory changes with every scan (the snapshot, the queue): watching it would feed itself.
    let own = ctx.state.parent().and_then(|d| d.strip_prefix(&cfg.root).ok()).map(|d| Path::new("/").join(d));
    let mut walk = Walk::new(cfg, scope.clone(), own.as_deref(), w, &ctx.stop);
    let unreadable = walk.unreadable.clone();
    let (mut chunk, mut notes, mut counts) = (Vec::new(), Vec::new(), [0; 3]);
    let now = crate::status::rfc3339(SystemTime::now());
    let mut flush = |chunk: &mut Vec<Change>, notes: &mut Vec<Event>, out: &mut Sealing| {
        let at = pace(next, Instant::now(), chunk.len(), cfg.max_eps);
        select! {
            recv(ctx.stop) -> _ => return Err(ScanError::Sink(SinkError::Stopped)),
            default(at.saturating_duration_since(Instant::now())) => {}
        }
        deliver(ctx, "fim", &std::mem::take(chunk), std::mem::take(notes), &now)?;
        out.line(format_args!("{MARK}"))
            .and_then(|()| out.0.flush())
            .and_then(|()| out.0.get_ref().sync_data())
            .map_err(save)
    };
    merge_join(old.into_iter().flatten(), &mut walk, |path, o, n| {
        if let Some(why) = bad.borrow().clone() {
            return Err(ScanError::Corrupt(why));
        }
        // Outside a partial scan's scope, or beneath a directory that could not be listed: kept as it was.
        let kept = n.is_none() && (!full && !under(&scope, &path) || under(&unreadable.borrow(), &path));
        if let Some(s) = if kept { o.as_ref() } else { n.as_ref() } {
            out.line(format_args!("{}\t{}", json!(path.to_string_lossy()), s.doc)).map_err(save)?;
        }
        let id = doc_id(&ctx.uuid, &path.to_string_lossy());
        let Some(c) = Change::of(id, o.filter(|_| !kept), n, |a, b| a.doc == b.doc) else { return Ok(()) };
        counts
            [usize::from(matches!(c, Change::Update { .. })) + 2 * usize::from(matches!(c, Change::Delete { .. }))] +=
            1;
        notes.extend((!first && upto.as_ref().is_none_or(|u| path <= *u)).then(|| notification(&c, &now)));
        chunk.push(c);
        // Tenths of a second's worth: no second holds much more than max_eps (a whole second's chunk at once did).
        if chunk.len() >= (cfg.max_eps / 10).clamp(1, 1000) { flush(&mut chunk, &mut notes, &mut out) } else { Ok(()) }
    })
    .and_then(|()| if chunk.is_empty() { Ok(()) } else { flush(&mut chunk, &mut notes, &mut out) })
    .and_then(|()| bad.take().map_or(Ok(()), |why| Err(ScanError::Corrupt(why))))
    // A walk cut by a stop is no baseline.
    .and_then(|()| match walk.stack.is_empty() && walk.roots.len() == 0 {
        true => Ok(()),
        false => Err(ScanError::Sink(SinkError::Stopped)),
    })
    .inspect_err(|e| _ = matches!(e, ScanError::Corrupt(_)).then(|| fs::remove_file(&tmp)))?;
    // Durable events first, snapshot second: a crash in between means a resend. A partial scan that changed nothing
    // leaves the old one (the copy is never synced: it may never reach the disk).
    if counts.iter().sum::<usize>() > 0 || full {
        let file = out.seal().map_err(save)?;
        file.sync_all().and_then(|()| fs::rename(&tmp, snapshot)).map_err(save)?;
        File::open(snapshot.parent().unwrap_or(Path::new("/"))).and_then(|d| d.sync_all()).map_err(save)?;
    } else {
        let _ = fs::remove_file(&tmp);
    }
    let ([files, over, denied, skipped], failed) = (walk.counts, walk.watches.map_or(0, |w| w.failed));
    if full && over > 0 && !std::mem::replace(&mut warned[0], true) {
        log::warn!("fim: fim.max_files ({}) is reached; {over} files are not monitored", cfg.max_files);
    }
    if full && failed > 0 && !std::mem::replace(&mut warned[1], true) {
        let why = "the inotify watch limit (fs.inotify.max_user_watches, or 4 MiB of watched paths) is reached";
        log::warn!("fim: {why}; {failed} directories are checked by the scheduled scan only");
    }
    let ([created, updated, deleted], ms, dirs) = (counts, started.elapsed().as_millis(), unreadable.borrow().len());
    let (kind, first) =
        (if full { "full scan" } else { "changes" }, if first { " (first scan: no notifications)" } else { "" });
    Ok(Some(format!(
        "fim: {kind}: {files} files (scan {ms} ms); {created} created, {updated} updated, {deleted} deleted; {over} over \
         fim.max_files, {denied} not hashed (unreadable), {dirs} directories unreadable (documents kept), {skipped} \
         skipped (not UTF-8, over 4096 bytes, or past 65536 names held at once), {failed} directories not watched{first}"
    )))
}

fn run(config: Config, ctx: Context) {
    // Scans are background work on a small host (best effort: at normal priority they still work).
    let _ = crate::sys::set_thread_nice(10);
    let cfg = &config.fim;
    let inotify = cfg.paths.iter().any(|p| p.realtime).then(crate::sys::inotify).and_then(|r| {
        r.inspect_err(|e| log::warn!("fim: cannot open inotify ({e}); realtime paths get the scheduled scan only")).ok()
    });
    let mut watches = inotify.map(|fd| Watches { fd, dirs: HashMap::new(), failed: 0, bytes: 0 });
    let (mut dirty, mut buf, mut pacing, mut warned) = (BTreeMap::new(), vec![0; 16 << 10], None, [false; 3]);
    // `scan_on_start = false`: the first scan (and with it realtime) comes after one interval.
    let mut next_scan = Instant::now() + if cfg.scan_on_start { Duration::ZERO } else { cfg.interval };
    let (mut earliest, mut last_partial, mut rescan) = (Instant::now(), Instant::now(), None);
    loop {
        let now = Instant::now();
        if now >= next_scan || rescan.is_some_and(|t| now >= t) {
            let cpu = crate::sys::thread_cpu_time();
            dirty.clear();
            watches.iter_mut().for_each(|w| w.failed = 0);
            let result = reconcile(cfg, &ctx, watches.as_mut(), (&mut pacing, &mut warned), None);
            // A write storm that overflows the queue must not become a scan loop: 10 times a scan's CPU time apart
            // (not its length, which max_eps pacing, a slow server or a busy host at nice 10 stretch for minutes).
            earliest = Instant::now() + (crate::sys::thread_cpu_time().saturating_sub(cpu) * 10).max(COALESCE);
            let retry = if result.is_ok() { cfg.interval } else { cfg.interval.min(Duration::from_secs(60)) };
            // A scan longer than that (fim.interval may be 1s over a large tree) is followed by as long a pause: the
            // thread scans at most half the time.
            let retry = retry.max(now.elapsed());
            (next_scan, rescan) = (Instant::now() + retry, None);
            match result {
                Ok(line) => log::info!("{}", line.unwrap_or_default()),
                Err(ScanError::Sink(SinkError::Stopped)) => break,
                Err(e @ ScanError::Corrupt(_)) => {
                    log::error!("fim: {e}");
                    (fs::remove_file(&ctx.state).ok(), next_scan = Instant::now()).1
                }
                Err(e) => log::warn!("fim: {e}"),
            }
            crate::memory::release_free();
        } else if now >= last_partial + COALESCE && dirty.values().any(|t| now >= *t + COALESCE) {
            // Names beside a configured file (its directory is watched) are no one's.
            let scope: Vec<PathBuf> = due(&mut dirty, now).into_iter().filter(|p| settings(cfg, p).is_some()).collect();
            match (!scope.is_empty())
                .then(|| reconcile(cfg, &ctx, watches.as_mut(), (&mut pacing, &mut warned), Some(scope)))
            {
                Some(Ok(line)) => log::debug!(
                    "{}",
                    line.unwrap_or_else(|| "fim: no baseline yet; changes wait for the full scan".into())
                ),
                Some(Err(ScanError::Sink(SinkError::Stopped))) => break,
                // What was not delivered is found by a full scan (a corrupt snapshot is replaced by one).
                Some(Err(e)) => {
                    log::warn!("fim: {e}");
                    rescan = Some(earliest.max(now));
                }
                None => {}
            }
            // At most one partial scan per window, each streams the whole snapshot: a longer one is followed by as
            // long a pause.
            last_partial = Instant::now() + now.elapsed().saturating_sub(COALESCE);
        }
        let first_due = dirty.values().min().map(|t| (*t + COALESCE).max(last_partial + COALESCE));
        // Woken at least twice a second to see a stop: the inotify descriptor cannot be in a select.
        let wake = [Some(next_scan), rescan, first_due].into_iter().flatten().min().unwrap_or(next_scan);
        let wait = wake.saturating_duration_since(Instant::now()).min(Duration::from_millis(500));
        let Some(w) = watches.as_mut() else {
            select! { recv(ctx.stop) -> _ => break, default(wait) => continue }
        };
        let ready = crate::sys::wait_readable(&w.fd, wait);
        if ctx.stop.try_recv() == Err(Disconnected) {
            break;
        }
        while let Some(n) = ready.then(|| (&w.fd).read(&mut buf).ok()).flatten().filter(|n| *n > 0) {
            for (wd, mask, name) in parse_events(&buf[..n]) {
                let path = w.dirs.get(&wd).map(|d| if name.is_empty() { d.clone() } else { d.join(&name) });
                if mask & libc::IN_IGNORED != 0 {
                    w.forget(wd);
                    continue;
                }
                // A directory moved away keeps its watches, which would report under its old path: they go (one
                // moved within the tree is walked, and watched, again at its new name).
                if let Some(p) = path.as_ref().filter(|_| mask & libc::IN_MOVED_FROM != 0 && mask & libc::IN_ISDIR != 0)
                {
                    let gone: Vec<i32> = w.dirs.iter().filter(|(_, d)| d.starts_with(p)).map(|(wd, _)| *wd).collect();
                    for wd in gone {
                        crate::sys::rm_watch(&w.fd, wd);
                        w.forget(wd);
                    }
                }
                if mask & libc::IN_Q_OVERFLOW != 0 || path.is_some_and(|p| !touch(&mut dirty, p, Instant::now())) {
                    if !std::mem::replace(&mut warned[2], true) {
                        log::warn!(
                            "fim: the inotify queue overflowed (fs.inotify.max_queued_events), or over {DIRTY_MAX} paths changed at once; a full scan follows"
                        );
                    }
                    (dirty.clear(), rescan = Some(earliest.max(Instant::now()))).1
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(wd: i32, mask: u32, name: &str, pad: usize) -> Vec<u8> {
        let mut name = name.as_bytes().to_vec();
        name.resize(name.len() + pad, 0);
        let mut out =
            [wd.to_ne_bytes(), mask.to_ne_bytes(), 0u32.to_ne_bytes(), (name.len() as u32).to_ne_bytes()].concat();
        out.extend(name);
        out
    }

    #[test]
    fn inotify_events_are_parsed_and_a_truncated_tail_dropped() {
        let name = |s: &str| OsString::from(s);
        type Events = Vec<(i32, u32, OsString)>;
        let table: Vec<(&str, Vec<u8>, Events)> = vec![
            ("empty", vec![], vec![]),
            ("one, padded", event(1, libc::IN_CREATE, "a.conf", 10), vec![(1, libc::IN_CREATE, name("a.conf"))]),
            ("no name (overflow)", event(-1, libc::IN_Q_OVERFLOW, "", 0), vec![(-1, libc::IN_Q_OVERFLOW, name(""))]),
            (
                "two",
                [event(1, libc::IN_MODIFY, "x", 3), event(2, libc::IN_DELETE, "yy", 14)].concat(),
                vec![(1, libc::IN_MODIFY, name("x")), (2, libc::IN_DELETE, name("yy"))],
            ),
            ("a header cut short", event(1, libc::IN_MODIFY, "x", 3)[..10].to_vec(), vec![]),
            (
                "a name cut short",
                [event(1, libc::IN_MODIFY, "x", 3), event(2, libc::IN_DELETE, "yy", 14)[..20].to_vec()].concat(),
                vec![(1, libc::IN_MODIFY, name("x"))],
            ),
        ];
        for (what, buf, want) in table {
            assert_eq!(parse_events(&buf), want, "{what}");
        }
    }

    #[test]
    fn a_burst_is_one_change_per_path_and_a_directory_covers_what_is_beneath() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut dirty = BTreeMap::new();
        for (path, ms) in [("/etc/a", 0), ("/etc/a", 500), ("/etc/d/x", 100), ("/etc/d", 200), ("/etc/z", 900)] {
            assert!(touch(&mut dirty, path.into(), at(ms)));
        }
        assert_eq!(due(&mut dirty, at(999)), Vec::<PathBuf>::new(), "no window has ended");
        // /etc/a's window started at its first report; /etc/d covers /etc/d/x.
        assert_eq!(due(&mut dirty, at(1200)), [PathBuf::from("/etc/a"), "/etc/d".into()]);
        assert_eq!(dirty.keys().collect::<Vec<_>>(), ["/etc/z"]);
        assert!(touch(&mut dirty, "/etc/a".into(), at(1300)), "a new window");
        assert_eq!(due(&mut dirty, at(2300)), [PathBuf::from("/etc/a"), "/etc/z".into()]);
        let mut full: BTreeMap<PathBuf, Instant> = (0..DIRTY_MAX).map(|i| (format!("/{i}").into(), t0)).collect();
        assert!(touch(&mut full, "/0".into(), t0), "a path already in costs nothing");
        assert!(!touch(&mut full, "/new".into(), t0), "full: the caller scans everything instead");
    }

    #[test]
    fn changes_are_paced_to_max_eps() {
        let t0 = Instant::now();
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        let mut next = None;
        // (now, chunk, eps) → when it may go
        for (now, n, eps, at) in [(0.0, 200, 200, 0.0), (0.1, 200, 200, 1.0), (0.2, 50, 200, 2.0), (5.0, 10, 10, 5.0)] {
            assert_eq!(pace(&mut next, s(now), n, eps), s(at), "{now} {n} {eps}");
        }
        assert_eq!(next, Some(s(6.0)));
    }

    #[test]
    fn paths_beneath_a_set_and_the_settings_of_the_most_specific_path() {
        let set: Vec<PathBuf> = ["/a/b", "/a/c", "/e"].map(PathBuf::from).to_vec();
        for (path, want) in [
            ("/a/b", true),
            ("/a/b/x/y", true),
            ("/a/b.txt", false),
            ("/a", false),
            ("/d", false),
            ("/e/f", true),
            ("/f", false),
        ] {
            assert_eq!(under(&set, Path::new(path)), want, "{path}");
        }
        let p = |path: &str, depth, realtime| FimPath { path: path.into(), depth, realtime };
        let cfg = FimConfig { paths: vec![p("/etc", 256, false), p("/etc/ssh", 0, true)], ..FimConfig::default() };
        let of = |path: &str| settings(&cfg, Path::new(path)).map(|(s, level)| (s.path.clone(), level, s.realtime));
        assert_eq!(of("/etc/passwd"), Some(("/etc".into(), 1, false)));
        assert_eq!(of("/etc/ssh/sshd_config"), Some(("/etc/ssh".into(), 1, true)));
        assert_eq!(of("/etc"), Some(("/etc".into(), 0, false)));
        assert_eq!(of("/usr/bin"), None);
    }

    #[test]
    fn notifications_name_the_fields_that_changed_with_their_old_values() {
        let doc = |f: Value| Stored { collector: "file".into(), doc: json!({ "file": f }).to_string() };
        let a = json!({"path": "/etc/x", "mode": "0644", "size": 1, "hash": {"sha256": "aa", "md5": "m"}});
        let table = [
            (
                "mode",
                json!({"path": "/etc/x", "mode": "0600", "size": 1, "hash": {"sha256": "aa", "md5": "m"}}),
                json!(["file.mode"]),
                json!({"mode": "0644"}),
            ),
            (
                "content",
                json!({"path": "/etc/x", "mode": "0644", "size": 2, "hash": {"sha256": "bb", "md5": "n"}}),
                json!(["file.hash.md5", "file.hash.sha256", "file.size"]),
                json!({"hash": {"md5": "m", "sha256": "aa"}, "size": 1}),
            ),
            (
                "now too large to hash",
                json!({"path": "/etc/x", "mode": "0644", "size": 1, "attributes": ["unhashed"]}),
                json!(["file.attributes", "file.hash.md5", "file.hash.sha256"]),
                json!({"attributes": null, "hash": {"md5": "m", "sha256": "aa"}}),
            ),
        ];
        for (what, b, fields, previous) in table {
            let c = Change::Update { id: "i".into(), old: doc(a.clone()), new: doc(b.clone()) };
            let e = notification(&c, "T");
            assert_eq!(e.header(), r#"{"collector":"file","module":"fim"}"#);
            let d: Value = serde_json::from_str(e.data().unwrap()).unwrap();
            assert_eq!(d["event"]["type"], "modified", "{what}");
            assert_eq!(d["event"]["changed_fields"], fields, "{what}");
            assert_eq!(d["file"]["previous"], previous, "{what}");
            assert_eq!(d["file"]["size"], b["size"], "{what}: the new document");
            assert_eq!(d["event"]["reason"], "File /etc/x was modified");
        }
        let d: Value = serde_json::from_str(
            notification(&Change::Delete { id: "i".into(), old: doc(a.clone()) }, "T").data().unwrap(),
        )
        .unwrap();
        assert_eq!(
            (d["event"]["type"].as_str(), &d["file"]["hash"]["sha256"]),
            (Some("deleted"), &json!("aa")),
            "the old document"
        );
    }

    /// A stop that never comes, for walks in tests.
    fn never() -> &'static crossbeam_channel::Receiver<()> {
        Box::leak(Box::new(crossbeam_channel::never()))
    }

    fn walk(root: &Path, cfg: FimConfig) -> (Vec<String>, [usize; 4]) {
        let cfg = FimConfig {
            root: root.into(),
            hashes: vec!["sha256".into()],
            max_file_bytes: 100,
            max_files: cfg.max_files.max(1000),
            ..cfg
        };
        let mut w = Walk::new(&cfg, roots(&cfg), None, None, never());
        let found: Vec<String> = w.by_ref().map(|(p, _)| p.display().to_string()).collect();
        (found, w.counts)
    }

    fn tree(files: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for f in files {
            let p = root.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, f).unwrap();
        }
        root
    }

    #[test]
    fn the_walk_is_in_path_order_within_depth_and_ignores_what_it_is_told() {
        let root = tree(&[
            "d/a/x",
            "d/a.txt",
            "d/b",
            "d/deep/1/2/f",
            "d/x.swp",
            "d/cache/c",
            "d/sub/cache/c",
            "d/keep/cache.txt",
            "etc/ssh/k",
            "etc/ssh/deeper/k",
            "etc/top",
        ]);
        let p = |path: &str, depth| FimPath { path: path.into(), depth, realtime: false };
        // Path order, not string order: "/d/a/x" < "/d/a.txt" (component "a" < "a.txt").
        let cfg = FimConfig {
            paths: vec![p("/d", 256)],
            ignore: vec!["*.swp".into(), "**/cache/**".into(), "/d/cache".into()],
            ..FimConfig::default()
        };
        let (found, _) = walk(root.path(), cfg);
        assert_eq!(found, ["/d/a/x", "/d/a.txt", "/d/b", "/d/deep/1/2/f", "/d/keep/cache.txt"]);
        // Depth 1: /d's entries and one level of directories below; a path inside another takes its own settings.
        let cfg = FimConfig { paths: vec![p("/d", 1), p("/etc/ssh", 0)], ..FimConfig::default() };
        let (found, _) = walk(root.path(), cfg);
        assert_eq!(found, ["/d/a/x", "/d/a.txt", "/d/b", "/d/cache/c", "/d/keep/cache.txt", "/d/x.swp", "/etc/ssh/k"]);
        // A single file; a path that does not exist.
        let cfg = FimConfig { paths: vec![p("/etc/top", 256), p("/nowhere", 256)], ..FimConfig::default() };
        assert_eq!(walk(root.path(), cfg).0, ["/etc/top"]);
        // max_files: the first ones in path order, the rest counted.
        let cfg = FimConfig { paths: vec![p("/d", 256)], max_files: 2, ..FimConfig::default() };
        let cfg = FimConfig { root: root.path().into(), ..cfg };
        let mut w = Walk::new(&cfg, vec![PathBuf::from("/d")], None, None, never());
        assert_eq!(w.by_ref().count(), 2);
        assert_eq!(w.counts[..2], [2, 6]);
    }

    #[test]
    fn links_fifos_and_large_files_are_recorded_never_followed_or_read() {
        let root = tree(&["d/f", "outside/secret"]);
        let d = root.path().join("d");
        std::os::unix::fs::symlink(root.path().join("outside"), d.join("to-dir")).unwrap();
        std::os::unix::fs::symlink("../outside/secret", d.join("to-file")).unwrap();
        std::os::unix::fs::symlink("..", d.join("up")).unwrap();
        fs::write(d.join("large"), vec![b'x'; 101]).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(d.join("fifo")).status().unwrap().success());
        let cfg = FimConfig {
            paths: vec![FimPath { path: "/d".into(), depth: 256, realtime: false }],
            ..FimConfig::default()
        };
        let full = FimConfig {
            root: root.path().into(),
            hashes: vec!["sha256".into()],
            max_file_bytes: 100,
            max_files: 1000,
            ..cfg.clone()
        };
        let mut w = Walk::new(&full, vec![PathBuf::from("/d")], None, None, never());
        let docs: BTreeMap<String, Value> = w
            .by_ref()
            .map(|(p, s)| (p.display().to_string(), serde_json::from_str::<Value>(&s.doc).unwrap()["file"].take()))
            .collect();
        assert_eq!(
            docs.keys().collect::<Vec<_>>(),
            ["/d/f", "/d/fifo", "/d/large", "/d/to-dir", "/d/to-file", "/d/up"]
        );
        assert_eq!(docs["/d/fifo"]["type"], "other");
        assert_eq!((&docs["/d/large"]["attributes"], docs["/d/large"]["hash"].is_null()), (&json!(["unhashed"]), true));
        assert_eq!(
            (&docs["/d/to-file"]["type"], &docs["/d/to-file"]["target_path"]),
            (&json!("symlink"), &json!("../outside/secret"))
        );
        assert!(docs["/d/to-file"]["hash"].is_null() && docs["/d/f"]["hash"]["sha256"].is_string());
        // Followed: the targets are read; a directory already on the way down (here /d, through "up") is not entered.
        let (found, _) = walk(root.path(), FimConfig { follow_symlinks: true, ..cfg });
        let want = ["/d/f", "/d/fifo", "/d/large", "/d/to-dir/secret", "/d/to-file", "/d/up/outside/secret"];
        assert_eq!(found, want);
    }

    #[test]
    fn followed_links_enter_each_directory_once_however_many_lead_there() {
        // An account that can write in the tree makes a lattice: each level's two links lead to the next level, so
        // 40 levels are 2^40 paths. Before, with follow_symlinks, the walk took them all (no cycle: none repeats on
        // the way down).
        let root = tree(&[]);
        for i in 0..40 {
            let level = root.path().join(format!("d/l{i:02}"));
            fs::create_dir_all(&level).unwrap();
            fs::write(level.join("f"), "x").unwrap();
            for link in ["a", "b"] {
                std::os::unix::fs::symlink(format!("../l{:02}", i + 1), level.join(link)).unwrap();
            }
        }
        let cfg = FimConfig {
            root: root.path().into(),
            paths: vec![FimPath { path: "/d".into(), depth: 256, realtime: false }],
            follow_symlinks: true,
            max_files: 1 << 20,
            ..FimConfig::default()
        };
        let mut w = Walk::new(&cfg, vec![PathBuf::from("/d")], None, None, never());
        let found: Vec<PathBuf> = w.by_ref().take(100_000).map(|(p, _)| p).collect();
        assert!(found.len() < 200, "{} paths, and more", found.len());
        assert!(found.contains(&"/d/l00/a/f".into()) && found.contains(&"/d/l39/f".into()), "{found:?}");
    }

    #[test]
    fn a_directory_or_file_swapped_for_a_link_or_fifo_after_the_listing_is_not_followed_or_read() {
        let root = tree(&["d/x", "outside/secret"]);
        let (d, outside) = (root.path().join("d"), root.path().join("outside"));
        let cfg = FimConfig {
            root: root.path().into(),
            paths: vec![FimPath { path: "/d".into(), depth: 256, realtime: false }],
            hashes: vec!["sha256".into()],
            max_file_bytes: 100,
            ..FimConfig::default()
        };
        let mut w = Walk::new(&cfg, Vec::new(), None, None, never());
        // lstat saw a directory (or a file); by the descent (or the open) an account put a link there.
        std::os::unix::fs::symlink(&outside, d.join("swapped")).unwrap();
        w.enter("/d/swapped".into(), &d.join("swapped"), &fs::metadata(&outside).unwrap(), false);
        assert!(w.stack.is_empty() && w.unreadable.borrow().as_slice() == [PathBuf::from("/d/swapped")]);
        std::os::unix::fs::symlink(outside.join("secret"), d.join("link")).unwrap();
        assert!(w.digest(&d.join("link"), &fs::metadata(outside.join("secret")).unwrap()).is_err());
        // Or a FIFO with the file's size: not opened for reading (it would block), not read.
        assert!(std::process::Command::new("mkfifo").arg(d.join("fifo")).status().unwrap().success());
        assert!(w.digest(&d.join("fifo"), &fs::metadata(d.join("x")).unwrap()).is_err());
    }

    #[test]
    fn a_walk_holds_a_bounded_number_of_names_and_counts_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("d");
        fs::create_dir(&d).unwrap();
        for i in 0..NAMES_MAX + 10 {
            File::create(d.join(i.to_string())).unwrap();
        }
        let (found, counts) = walk(
            root.path(),
            FimConfig {
                paths: vec![FimPath { path: "/d".into(), depth: 0, realtime: false }],
                max_files: 1 << 20,
                ..FimConfig::default()
            },
        );
        assert_eq!((found.len(), counts[3]), (NAMES_MAX, 10));
    }

    #[test]
    fn a_watch_through_proc_self_fd_reports_the_directory_it_pins() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watches { fd: crate::sys::inotify().unwrap(), dirs: HashMap::new(), failed: 0, bytes: 0 };
        w.add(&handle(dir.path()).unwrap(), Path::new("/watched"));
        fs::write(dir.path().join("new"), "x").unwrap();
        let mut buf = vec![0; 4096];
        assert!(crate::sys::wait_readable(&w.fd, Duration::from_secs(5)));
        let n = (&w.fd).read(&mut buf).unwrap();
        let events = parse_events(&buf[..n]);
        assert!(
            events
                .iter()
                .any(|(wd, m, name)| w.dirs[wd] == Path::new("/watched") && m & libc::IN_CREATE != 0 && name == "new"),
            "{events:?}"
        );
        // Past the watch limit no watch is tried until the next full scan resets the count.
        w.failed = 1;
        w.add(&handle(dir.path()).unwrap(), Path::new("/other"));
        assert_eq!((w.failed, w.dirs.len()), (2, 1));
        // The paths held are bounded in bytes; a watch added again (same wd) is counted once.
        w.failed = 0;
        w.add(&handle(dir.path()).unwrap(), Path::new("/watched"));
        assert_eq!((w.failed, w.dirs.len(), w.bytes), (0, 1, 8));
        w.bytes = WATCHED_BYTES - 3;
        let other = tempfile::tempdir().unwrap();
        w.add(&handle(other.path()).unwrap(), Path::new("/other"));
        assert_eq!((w.failed, w.dirs.len()), (1, 1));
    }

    #[test]
    fn a_snapshot_cut_anywhere_or_with_any_byte_changed_is_not_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut out = Sealing(BufWriter::new(File::create(&path).unwrap()), crc32fast::Hasher::new(), 0);
        for line in [r#"{"uuid":"u"}"#, "\"/a\"\t{\"file\":{\"size\":1}}", "\"/b\"\t{\"file\":{\"size\":2}}"] {
            out.line(format_args!("{line}")).unwrap();
        }
        out.seal().unwrap();
        let whole = fs::read(&path).unwrap();
        let sealed_as = |bytes: &[u8]| (fs::write(&path, bytes).unwrap(), sealed(&File::open(&path).unwrap())).1;
        assert_eq!(sealed_as(&whole), Some(3));
        // Cut anywhere but the final newline; every byte changed in turn.
        for at in 0..whole.len() - 1 {
            assert_eq!(sealed_as(&whole[..at]), None, "cut at {at}");
            let mut flipped = whole.clone();
            flipped[at] ^= 0x01;
            assert_eq!(sealed_as(&flipped), None, "byte {at} changed");
        }
    }

    #[test]
    fn a_scan_cut_short_resumes_from_its_last_durable_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let (snapshot, tmp) = (dir.path().join("fim.snapshot"), dir.path().join("fim.tmp"));
        let write = |path: &Path, lines: &[&str], seal: bool| {
            let mut out = Sealing(BufWriter::new(File::create(path).unwrap()), crc32fast::Hasher::new(), 0);
            lines.iter().for_each(|l| out.line(format_args!("{l}")).unwrap());
            if seal { out.seal().unwrap() } else { out.0.into_inner().unwrap() }
        };
        let docs =
            |path: &Path| fs::read_to_string(path).unwrap().lines().skip(1).map(String::from).collect::<Vec<_>>();
        let old = [r#"{"uuid":"u"}"#, "\"/a\"\t1", "\"/b\"\t1", "\"/c\"\t1", "\"/d\"\t1"];
        write(&snapshot, &old, true);
        // Nothing delivered (no mark): the old snapshot stays.
        write(&tmp, &[r#"{"uuid":"u"}"#, "\"/a\"\t2"], false);
        resume(&tmp, &snapshot).unwrap();
        assert!(!tmp.exists() && sealed(&File::open(&snapshot).unwrap()) == Some(5));
        // Delivered up to /b (a created, b updated); /c past the last mark, and a torn line, are not.
        write(&tmp, &[r#"{"uuid":"u"}"#, "\"/a.new\"\t2", "\"/b\"\t2", MARK, "\"/c\"\t2", "\"/d"], false);
        resume(&tmp, &snapshot).unwrap();
        assert!(!tmp.exists() && sealed(&File::open(&snapshot).unwrap()).is_some());
        assert_eq!(docs(&snapshot)[..4], ["\"/a.new\"\t2", "\"/b\"\t2", "\"/c\"\t1", "\"/d\"\t1"]);
        // A first scan cut short: notifications start only past the last path delivered.
        fs::remove_file(&snapshot).unwrap();
        write(&tmp, &[r#"{"uuid":"u"}"#, "\"/a\"\t2", MARK, "\"/b\"\t2"], false);
        resume(&tmp, &snapshot).unwrap();
        let header: Value =
            serde_json::from_str(fs::read_to_string(&snapshot).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!(header, json!({"uuid": "u", "upto": "/a"}));
        assert_eq!(docs(&snapshot)[..1], ["\"/a\"\t2"]);
    }

    #[test]
    fn names_with_newlines_tabs_quotes_and_backslashes_cannot_forge_a_snapshot_line() {
        let names = ["a\nb", "q\"\t{\"file\":1}", "t\tab", "back\\slash", "\"/d/z\"\tx", "z"];
        let root = tree(&names.map(|n| format!("d/{n}")).iter().map(String::as_str).collect::<Vec<_>>());
        std::fs::write(root.path().join(OsString::from_vec(b"d/not-utf8-\xff".to_vec())), "x").unwrap();
        let cfg = FimConfig {
            paths: vec![FimPath { path: "/d".into(), depth: 256, realtime: false }],
            ..FimConfig::default()
        };
        let (found, counts) = walk(root.path(), cfg);
        assert_eq!((found.len(), counts[3]), (names.len(), 1), "the name that is not UTF-8 is skipped");
        // Written as reconcile writes them, read back as one document per line, in order, the same paths.
        let path = root.path().join("s");
        let mut out = Sealing(BufWriter::new(File::create(&path).unwrap()), crc32fast::Hasher::new(), 0);
        out.line(format_args!("{{}}")).unwrap();
        for p in &found {
            out.line(format_args!("{}\t{}", json!(p), json!({"file": {"path": p}}))).unwrap();
        }
        let n = out.seal().and_then(|_| Ok(sealed(&File::open(&path)?))).unwrap().unwrap();
        let mut lines = BufReader::new(File::open(&path).unwrap()).split(b'\n').take(n);
        lines.next();
        let bad = Rc::new(RefCell::new(None));
        let s = Snapshot { lines, last: None, at: ("s".into(), 1), bad: bad.clone() };
        let back: Vec<String> = s.map(|(p, _)| p.display().to_string()).collect();
        assert_eq!((back, bad.borrow().clone()), (found, None));
    }

    #[test]
    fn a_snapshot_line_out_of_order_or_not_a_document_ends_it_and_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let table = [
            ("in order", "\"/a\"\t{}\n\"/a/b\"\t{}\n\"/a.txt\"\t{}\n", 3, None),
            ("out of order", "\"/b\"\t{}\n\"/a\"\t{}\n", 1, Some("line 3")),
            ("a repeated path", "\"/a\"\t{}\n\"/a\"\t{}\n", 1, Some("line 3")),
            ("no tab", "\"/a\" {}\n", 0, Some("line 2")),
            ("not a JSON string", "/a\t{}\n", 0, Some("line 2")),
            ("not a JSON document", "\"/a\"\t{}\n\"/b\"\t{\"file\"\n", 1, Some("line 3")),
        ];
        for (what, text, n, bad) in table {
            let path = dir.path().join("s");
            fs::write(&path, text).unwrap();
            let cell = Rc::new(RefCell::new(None));
            let s = Snapshot {
                lines: BufReader::new(File::open(&path).unwrap()).split(b'\n').take(usize::MAX),
                last: None,
                at: ("s".into(), 1),
                bad: cell.clone(),
            };
            assert_eq!(s.count(), n, "{what}");
            let got = cell.borrow().clone();
            assert_eq!(got.as_deref().map(|b| &b[2..8]), bad, "{what}: {got:?}");
        }
    }
}
