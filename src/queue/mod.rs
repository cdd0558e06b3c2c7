//! The durable queue under `<data_dir>/queue/` (ARCHITECTURE.md, The durable queue): what it acked survives
//! `kill -9` and power loss. The queue thread ([`run`]) is the only owner of its files.

pub mod format;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crossbeam_channel::{Receiver, Sender, select};

use crate::event::{Event, Kind};
use crate::fsutil;
use crate::status::Stats;

/// Segment size bound: also (with one record past it) the most a reader holds in memory.
pub const SEGMENT_MAX: u64 = 1 << 20;
/// At most this many append requests share one fsync, so a round stays short under a flood.
const GROUP_COMMIT_MAX: usize = 256;

/// A position in the queue: segment id and byte offset inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub seg: u64,
    pub off: u64,
}

/// Why the queue refused or failed an operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// `events.queue_max_bytes` would be exceeded; nothing of the request was written.
    #[error("queue full (events.queue_max_bytes = {max} reached); retry later")]
    Full { max: u64 },
    /// An event is longer than the one maximum record size; neither it nor the rest was written.
    #[error("an event is longer than the largest record ({} bytes)", crate::event::MAX_RECORD_BYTES)]
    TooLarge,
    /// A read, write or fsync of `what` failed: nothing of the request is durable (shared: it answers a round).
    #[error("durable queue write failed: {what}: {source}")]
    Io { what: String, source: Arc<io::Error> },
    /// The queue thread is gone (shutdown).
    #[error("the agent is shutting down")]
    Closed,
}

/// Adds the operation and the file to an I/O error.
fn io_err<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> QueueError + 'a {
    move |e| QueueError::Io { what: format!("{what} {}", path.display()), source: Arc::new(e) }
}

/// A request to make events durable. The reply comes after the fsync that covers them.
pub struct Append {
    pub events: Vec<Event>,
    pub reply: Sender<Appended>,
}

/// The answer to an [`Append`]: the first `stored` events are durable; `error` says why the rest were refused.
#[derive(Debug, Clone)]
pub struct Appended {
    pub stored: usize,
    pub error: Option<QueueError>,
}

impl Appended {
    pub fn all_stored(&self, n: usize) -> bool {
        self.stored == n && self.error.is_none()
    }
}

/// Hands `events` to the queue thread and waits up to `timeout`; a gone or silent queue refuses all.
pub fn append_and_wait(queue: &Sender<Append>, events: Vec<Event>, timeout: std::time::Duration) -> Appended {
    let (reply, answer) = crossbeam_channel::bounded(1);
    let answered = queue.send(Append { events, reply }).ok().and_then(|()| answer.recv_timeout(timeout).ok());
    answered.unwrap_or(Appended { stored: 0, error: Some(QueueError::Closed) })
}

/// Shutdown: keeps unsent stateless events in the durable queue for the next start; those it cannot
/// keep are counted as dropped, exactly. Tracked events are not kept: their sources read them again.
pub fn spill(queue: &Sender<Append>, mut events: Vec<Event>, stats: &Stats, what: &str) {
    let all = events.len();
    events.retain(|e| !e.is_tracked());
    if events.len() < all {
        log::info!("{} unsent events ({what}) stay in the files they were read from", all - events.len());
    }
    let n = events.len();
    if n == 0 {
        return;
    }
    // The queue stops at a record too large: set aside, such records do not cost the rest.
    let (events, big): (Vec<Event>, Vec<Event>) = events.into_iter().partition(format::fits);
    // 10 s: one group commit; a queue that takes longer is stuck on a dying disk.
    let r = append_and_wait(queue, events, std::time::Duration::from_secs(10));
    let (saved, lost) = (r.stored, n - r.stored);
    let big = (!big.is_empty()).then(|| format!("{} longer than the largest record", big.len()));
    let why = r.error.map(|e| e.to_string()).into_iter().chain(big).collect::<Vec<_>>().join("; ");
    if lost > 0 {
        log::error!("saved {saved} of {n} unsent stateless events ({what}); the other {lost} are lost ({why})");
    } else {
        log::info!("saved {n} unsent stateless events ({what}) to the durable queue for the next start");
    }
    Stats::add(&stats.dropped, lost as u64);
}

/// Events read back for delivery. All of one kind (one endpoint).
#[derive(Debug)]
pub struct QueueBatch {
    pub kind: Kind,
    pub events: Vec<Event>,
    /// Position after the last event: the cursor once the batch is delivered.
    pub end: Pos,
    /// Bytes of the frames in the batch (for the backlog counter).
    pub frame_bytes: u64,
}

/// Sent back by the uploader when a batch needs no more delivery attempts.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub end: Pos,
    pub records: u64,
    pub frame_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_events: usize,
    /// Bound on the request body, including `overhead` (the agent line).
    pub max_bytes: usize,
    pub overhead: usize,
}

struct Loaded {
    seg: u64,
    /// Whether `bytes` runs to the segment's final end (it was sealed when loaded). If not,
    /// records appended after the load follow `bytes` and must be read before moving on.
    sealed: bool,
    base: u64,
    bytes: Vec<u8>,
    frames: Vec<Range<usize>>,
    next: usize,
}

/// The queue's files and positions. Owned by the queue thread.
pub struct QueueStore {
    dir: PathBuf,
    /// Segment ids on disk, oldest first. The last one is the active (appended) segment.
    segments: VecDeque<u64>,
    active: File,
    active_len: u64,
    /// Everything before this is on disk and fsynced; its segment is the active one.
    durable: Pos,
    /// First record not yet delivered (persisted in `cursor`).
    cursor: Pos,
    /// Next record to hand out.
    read: Pos,
    loaded: Option<Loaded>,
    max_bytes: u64,
    /// Bytes of undelivered frames and their count (what the cap and status use).
    backlog_bytes: u64,
    backlog_records: u64,
    stats: Arc<Stats>,
}

fn seg_name(id: u64) -> String {
    format!("{id:020}.seg")
}

fn decode_cursor(b: &[u8]) -> Option<Pos> {
    if b.len() != 20 || crc32fast::hash(&b[..16]).to_le_bytes() != b[16..20] {
        return None;
    }
    Some(Pos { seg: u64::from_le_bytes(b[..8].try_into().ok()?), off: u64::from_le_bytes(b[8..16].try_into().ok()?) })
}

impl QueueStore {
    /// Opens (and recovers) the queue. Damaged data never stops it: it is skipped, counted, logged.
    pub fn open(dir: &Path, max_bytes: u64, stats: Arc<Stats>) -> Result<QueueStore, QueueError> {
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        // Root recovers the queue before dropping to agent.user, who owns data_dir: no links. Every name below is reached
        // beneath this handle (`fd`), so a directory swapped for a link after this check is not followed.
        let handle = fsutil::open_nofollow(OpenOptions::new().read(true), dir).map_err(io_err("cannot open", dir))?;
        let fd = fsutil::fd_path(&handle);
        let not_link = |e: &fs::DirEntry| {
            let link = e.file_type().is_ok_and(|t| t.is_symlink());
            if link {
                let shown = dir.join(e.file_name());
                log::error!("queue: {} is a symbolic link; refusing to follow it: removed", shown.display());
            }
            !link || fs::remove_file(e.path()).is_err()
        };
        let seg_id = |e: fs::DirEntry| -> Option<u64> { e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok() };
        let entries = fs::read_dir(&fd).map_err(io_err("cannot list", dir))?.filter_map(|e| e.ok());
        let mut ids: Vec<u64> = entries.filter(not_link).filter_map(seg_id).collect();
        ids.sort_unstable();

        let cursor_path = dir.join("cursor");
        let saved = fsutil::read_at(&fd.join("cursor"), &cursor_path).ok();
        let decoded = saved.as_deref().and_then(decode_cursor);
        if saved.is_some() && decoded.is_none() {
            let shown = cursor_path.display();
            log::error!(
                "queue cursor {shown} is damaged; delivering the whole queue again (duplicates possible, nothing lost)"
            );
        }
        let mut cursor = decoded.unwrap_or(Pos { seg: ids.first().copied().unwrap_or(0), off: 0 });
        // Segments wholly behind the cursor were delivered; a crash before their deletion leaves them.
        for id in ids.iter().filter(|id| **id < cursor.seg) {
            let _ = fs::remove_file(fd.join(seg_name(*id)));
        }
        ids.retain(|id| *id >= cursor.seg);
        if ids.first() != Some(&cursor.seg) {
            // The cursor's segment is gone (fully delivered, or lost): start at the next one.
            cursor = Pos { seg: ids.first().copied().unwrap_or(cursor.seg), off: 0 };
        }

        let (mut backlog_bytes, mut backlog_records) = (0, 0);
        for &id in &ids {
            let path = dir.join(seg_name(id));
            let bytes = fsutil::read_at(&fd.join(seg_name(id)), &path).map_err(io_err("cannot read", &path))?;
            let from = if id == cursor.seg { (cursor.off as usize).min(bytes.len()) } else { 0 };
            let scan = format::scan(&bytes, from);
            let shown = path.display();
            backlog_records += scan.frames.len() as u64;
            backlog_bytes += scan.frames.iter().map(|r| r.len() as u64).sum::<u64>();
            if scan.skipped > 0 {
                log::error!("queue segment {shown}: skipped {} damaged bytes between intact records", scan.skipped);
            }
            if scan.torn > 0 {
                log::warn!("queue segment {shown}: dropped a torn tail of {} bytes (an interrupted write)", scan.torn);
                if Some(&id) == ids.last() {
                    // Appends continue after the last intact record.
                    let f = fsutil::open_single(OpenOptions::new().write(true), &fd.join(seg_name(id)), &path)
                        .map_err(io_err("cannot open", &path))?;
                    f.set_len(scan.valid_end as u64).map_err(io_err("cannot truncate", &path))?;
                    f.sync_all().map_err(io_err("cannot fsync", &path))?;
                }
            }
        }
        if backlog_records > 0 {
            let shown = dir.display();
            log::info!("queue: {backlog_records} undelivered events ({backlog_bytes} bytes) recovered from {shown}");
        }

        // An empty queue starts its active segment at the cursor.
        let active_id = ids.last().copied().unwrap_or(cursor.seg);
        let segments: VecDeque<u64> = if ids.is_empty() { [active_id].into() } else { ids.into() };
        let active_path = dir.join(seg_name(active_id));
        let mut opts = OpenOptions::new();
        let active = fsutil::open_single(opts.create(true).append(true), &fd.join(seg_name(active_id)), &active_path)
            .map_err(io_err("cannot open", &active_path))?;
        let active_len = active.metadata().map_err(io_err("cannot stat", &active_path))?.len();
        // The active segment's name (maybe just created) is durable before anything in it is acknowledged.
        handle.sync_all().map_err(io_err("cannot fsync", dir))?;
        stats.queued.store(backlog_records, Relaxed);
        stats.queued_bytes.store(backlog_bytes, Relaxed);
        Ok(QueueStore {
            dir: dir.to_path_buf(),
            segments,
            active,
            active_len,
            durable: Pos { seg: active_id, off: active_len },
            cursor,
            read: cursor,
            loaded: None,
            max_bytes,
            backlog_bytes,
            backlog_records,
            stats,
        })
    }

    /// Logs a failure and shows it in state.json.
    fn report(&self, e: &QueueError) {
        log::error!("{e}");
        self.stats.set_error(e.to_string());
    }

    fn publish_stats(&self) {
        self.stats.queued.store(self.backlog_records, Relaxed);
        self.stats.queued_bytes.store(self.backlog_bytes, Relaxed);
    }

    pub fn backlog(&self) -> (u64, u64) {
        (self.backlog_records, self.backlog_bytes)
    }

    /// Writes the longest prefix of `events` under `queue_max_bytes` with no record too large and returns
    /// its length (not durable before [`sync`](Self::sync)). `Err` only for I/O: then [`rollback`](Self::rollback).
    pub fn append(&mut self, events: &[Event]) -> Result<usize, QueueError> {
        let (mut fit, mut total) = (0, 0u64);
        let mut buf = Vec::new();
        for e in events {
            let n = format::frame_len(e) as u64;
            // Never written: the reader would skip it as damaged after it was acknowledged.
            if !format::fits(e) || self.backlog_bytes + total + n > self.max_bytes {
                break;
            }
            let seg_len = self.active_len + buf.len() as u64;
            if seg_len + n > SEGMENT_MAX && seg_len > 0 {
                self.write_active(&buf)?;
                buf.clear();
                self.roll()?;
            }
            format::encode(e, &mut buf);
            (fit, total) = (fit + 1, total + n);
        }
        self.write_active(&buf)?;
        self.backlog_bytes += total;
        self.backlog_records += fit as u64;
        Ok(fit)
    }

    fn write_active(&mut self, buf: &[u8]) -> Result<(), QueueError> {
        self.active.write_all(buf).map_err(io_err("cannot write", &self.dir.join(seg_name(self.durable.seg))))?;
        self.active_len += buf.len() as u64;
        Ok(())
    }

    /// Seals the active segment (fsynced) and starts the next one.
    fn roll(&mut self) -> Result<(), QueueError> {
        self.sync()?;
        let id = self.durable.seg + 1;
        let path = self.dir.join(seg_name(id));
        // A new name (O_EXCL): never through a link planted there.
        let f = OpenOptions::new().create_new(true).append(true).open(&path).map_err(io_err("cannot create", &path))?;
        // The new name must be durable before records in it are acknowledged.
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync", &self.dir))?;
        self.active = f;
        self.segments.push_back(id);
        self.active_len = 0;
        self.durable = Pos { seg: id, off: 0 };
        Ok(())
    }

    /// One fsync covering everything appended since the last one (group commit).
    pub fn sync(&mut self) -> Result<(), QueueError> {
        let end = Pos { seg: self.durable.seg, off: self.active_len };
        if end == self.durable {
            return Ok(());
        }
        // fdatasync: the data and the file size are what recovery needs; timestamps are not.
        self.active.sync_data().map_err(io_err("cannot fsync", &self.dir.join(seg_name(self.durable.seg))))?;
        self.durable = end;
        self.publish_stats();
        Ok(())
    }

    /// After a failed write or fsync: cuts the active segment back to its durable end (no half-written
    /// or unacknowledged frame stays) and the backlog back to `(records, bytes)`, its value before.
    pub fn rollback(&mut self, (records, bytes): (u64, u64)) {
        let path = self.dir.join(seg_name(self.durable.seg));
        if let Err(e) = self.active.set_len(self.durable.off) {
            log::error!("cannot truncate {} after a failed write: {e}", path.display());
        }
        self.active_len = self.durable.off;
        (self.backlog_records, self.backlog_bytes) = (records, bytes);
    }

    fn load(&mut self) -> Result<(), QueueError> {
        let seg = self.read.seg;
        let path = self.dir.join(seg_name(seg));
        let mut f =
            fsutil::open_nofollow(OpenOptions::new().read(true), &path).map_err(io_err("cannot open", &path))?;
        let sealed = seg != self.durable.seg;
        let end = if sealed { f.metadata().map_err(io_err("cannot stat", &path))?.len() } else { self.durable.off };
        let len = end.saturating_sub(self.read.off);
        let mut bytes = Vec::with_capacity(len as usize);
        f.seek(SeekFrom::Start(self.read.off)).map_err(io_err("cannot seek", &path))?;
        f.take(len).read_to_end(&mut bytes).map_err(io_err("cannot read", &path))?;
        let scan = format::scan(&bytes, 0);
        if let damaged @ 1.. = scan.skipped + scan.torn {
            log::error!("queue segment {}: {damaged} damaged bytes skipped while reading", path.display());
        }
        self.loaded = Some(Loaded { seg, sealed, base: self.read.off, bytes, frames: scan.frames, next: 0 });
        Ok(())
    }

    /// The next batch of undelivered records, all of one kind, within `limits`.
    pub fn next_batch(&mut self, limits: BatchLimits) -> Result<Option<QueueBatch>, QueueError> {
        let (mut events, mut kind, mut body, mut frame_bytes) = (Vec::new(), None, limits.overhead, 0u64);
        while self.read < self.durable {
            if self.loaded.as_ref().is_none_or(|l| l.seg != self.read.seg || l.next >= l.frames.len()) {
                self.loaded = None;
                self.load()?;
            }
            let Some(l) = self.loaded.as_mut() else { break };
            if l.next >= l.frames.len() {
                // Nothing (more) intact in this segment up to its end.
                let end = l.base + l.bytes.len() as u64;
                self.loaded = None;
                if self.read.seg < self.durable.seg {
                    let next = self.segments.iter().copied().find(|s| *s > self.read.seg).unwrap_or(self.durable.seg);
                    self.read = Pos { seg: next, off: 0 };
                    continue;
                }
                self.read.off = end;
                break;
            }
            let r = l.frames[l.next].clone();
            let event = format::decode(&l.bytes[r.clone()]);
            let full = |e: &Event| events.len() >= limits.max_events || body + e.wire_len() > limits.max_bytes;
            // `kind` is set once `events` holds one.
            if event.as_ref().is_some_and(|e| kind.is_some_and(|k| k != e.kind || full(e))) {
                break;
            }
            l.next += 1;
            self.read.off = l.base + r.end as u64;
            match event {
                Some(event) => {
                    (kind, body, frame_bytes) =
                        (Some(event.kind), body + event.wire_len(), frame_bytes + r.len() as u64);
                    events.push(event);
                }
                None => log::error!("queue: skipped an intact frame with an undecodable payload in segment {}", l.seg),
            }
            // A finished segment sealed when loaded: move on at once so `end` names the next one.
            // (Sealed since the load: it may have grown after `bytes`; the next pass reloads it.)
            if l.sealed && l.next >= l.frames.len() && self.read.off >= l.base + l.bytes.len() as u64 {
                self.loaded = None;
                let next = self.segments.iter().copied().find(|s| *s > self.read.seg).unwrap_or(self.durable.seg);
                self.read = Pos { seg: next, off: 0 };
            }
        }
        Ok(kind.map(|kind| QueueBatch { kind, events, end: self.read, frame_bytes }))
    }

    /// Records a delivered batch: persists the cursor, deletes passed segments.
    pub fn ack(&mut self, ack: Ack) -> Result<(), QueueError> {
        if ack.end <= self.cursor {
            return Ok(());
        }
        let path = self.dir.join("cursor");
        let mut cursor = [ack.end.seg.to_le_bytes(), ack.end.off.to_le_bytes()].concat();
        cursor.extend_from_slice(&crc32fast::hash(&cursor).to_le_bytes());
        fsutil::write_atomic(&path, &cursor, 0o600).map_err(io_err("cannot write", &path))?;
        self.cursor = ack.end;
        self.backlog_records = self.backlog_records.saturating_sub(ack.records);
        self.backlog_bytes = self.backlog_bytes.saturating_sub(ack.frame_bytes);
        // Only now that the cursor is durable may the segments behind it go.
        while let Some(&old) = self.segments.front().filter(|&&s| s < self.cursor.seg && s != self.durable.seg) {
            let p = self.dir.join(seg_name(old));
            if let Err(e) = fs::remove_file(&p) {
                log::warn!("cannot delete delivered queue segment {}: {e}", p.display());
            }
            self.segments.pop_front();
        }
        if self.backlog_records == 0 {
            self.backlog_bytes = 0;
        }
        self.publish_stats();
        Ok(())
    }
}

/// Never sent (`run` offers a batch only while `pending` holds one); taking it needs no `unwrap`.
const NO_BATCH: QueueBatch =
    QueueBatch { kind: Kind::Stateful, events: Vec::new(), end: Pos { seg: 0, off: 0 }, frame_bytes: 0 };

/// The queue thread: appends (group commit), one batch at a time to the uploader, its acks, until `stop` closes.
pub fn run(
    mut store: QueueStore,
    appends: Receiver<Append>,
    acks: Receiver<Ack>,
    batches: Sender<QueueBatch>,
    stop: Receiver<()>,
    limits: impl Fn() -> BatchLimits,
) {
    let never_acks = crossbeam_channel::never::<Ack>();
    // Kept alive, never received from: a send to it is never ready.
    let (nobody, _nobody_rx) = crossbeam_channel::bounded::<QueueBatch>(0);
    let (mut uploader_gone, mut in_flight, mut pending) = (false, false, None::<QueueBatch>);
    loop {
        // Durable records wait to be handed out.
        if !uploader_gone && !in_flight && pending.is_none() && store.read < store.durable {
            pending = store.next_batch(limits()).inspect_err(|e| store.report(e)).ok().flatten();
        }
        let ack_in = if uploader_gone { &never_acks } else { &acks };
        // With no batch to offer, the send arm points at a channel nobody receives from (never
        // ready). `select!` moves the batch only if the uploader takes it; else it stays `pending`.
        let offer = if pending.is_some() { &batches } else { &nobody };
        select! {
            send(offer, pending.take().unwrap_or(NO_BATCH)) -> res => {
                // A failed send means the uploader is gone; the records stay on disk.
                if res.is_err() { uploader_gone = true; } else { in_flight = true; }
            }
            recv(appends) -> msg => match msg {
                Ok(a) => serve_appends(&mut store, a, &appends),
                Err(_) => break,
            },
            recv(ack_in) -> msg => match msg {
                Ok(a) => {
                    // On failure the cursor stays: the batch is delivered again after a restart.
                    let _ = store.ack(a).inspect_err(|e| store.report(e));
                    in_flight = false;
                }
                Err(_) => uploader_gone = true,
            },
            recv(stop) -> _ => break,
        }
    }
    // Appends that raced the stop are still served, so no producer waits on a dead queue.
    while let Ok(a) = appends.try_recv() {
        serve_appends(&mut store, a, &appends);
    }
    let _ = store.sync().inspect_err(|e| log::error!("{e}"));
}

/// Group commit: this request plus every one already waiting, one fsync, then replies.
fn serve_appends(store: &mut QueueStore, first: Append, more: &Receiver<Append>) {
    let round: Vec<Append> = std::iter::once(first).chain(more.try_iter().take(GROUP_COMMIT_MAX - 1)).collect();
    let before = store.backlog();
    // Collecting stops at the first failed write: the rest of the round is not attempted.
    let written: Result<Vec<usize>, QueueError> = round.iter().map(|a| store.append(&a.events)).collect();
    match written.and_then(|stored| store.sync().map(|()| stored)) {
        Ok(stored) => {
            let full = QueueError::Full { max: store.max_bytes };
            for (a, n) in round.into_iter().zip(stored) {
                let error = a.events.get(n).map(|e| if format::fits(e) { full.clone() } else { QueueError::TooLarge });
                // A producer that gave up waiting is not an error of the queue.
                let _ = a.reply.send(Appended { stored: n, error });
            }
        }
        Err(e) => {
            // Nothing of this round is durable: undo it and refuse it all.
            store.rollback(before);
            store.report(&e);
            for a in round {
                let _ = a.reply.send(Appended { stored: 0, error: Some(e.clone()) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: usize, kind: Kind) -> Event {
        Event::new(
            kind,
            &format!(r#"{{"module":"inventory","collector":"packages","operation":"create","id":"{i:03}"}}"#),
            Some(&format!(r#"{{"n":{i:03},"pad":"{}"}}"#, "p".repeat(100))),
        )
    }

    /// A stateful event with `pad` bytes of data.
    fn sized(i: usize, pad: usize) -> Event {
        Event::new(
            Kind::Stateful,
            &format!(r#"{{"module":"fim","operation":"update","id":"{i}"}}"#),
            Some(&format!("{{\"x\":\"{}\"}}", "y".repeat(pad))),
        )
    }

    const LIMITS: BatchLimits = BatchLimits { max_events: 1000, max_bytes: 1 << 20, overhead: 100 };

    fn open(dir: &Path) -> QueueStore {
        QueueStore::open(dir, 1 << 30, Arc::new(Stats::default())).unwrap()
    }

    fn drain(q: &mut QueueStore, limits: BatchLimits) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(b) = q.next_batch(limits).unwrap() {
            let n = b.events.len() as u64;
            q.ack(Ack { end: b.end, records: n, frame_bytes: b.frame_bytes }).unwrap();
            out.extend(b.events);
        }
        out
    }

    #[test]
    fn append_read_ack_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<Event> = (0..50).map(|i| ev(i, Kind::Stateful)).collect();
        {
            let mut q = open(dir.path());
            q.append(&events).unwrap();
            q.sync().unwrap();
            let b = q.next_batch(BatchLimits { max_events: 20, ..LIMITS }).unwrap().unwrap();
            assert_eq!(b.events, events[..20]);
            q.ack(Ack { end: b.end, records: 20, frame_bytes: b.frame_bytes }).unwrap();
            // The next batch is read but never acked: it comes back after a restart.
            let b = q.next_batch(BatchLimits { max_events: 20, ..LIMITS }).unwrap().unwrap();
            assert_eq!(b.events, events[20..40]);
        }
        let mut q = open(dir.path());
        assert_eq!(q.backlog().0, 30);
        assert_eq!(drain(&mut q, LIMITS), events[20..]);
        assert_eq!(q.backlog(), (0, 0));
    }

    #[test]
    fn batches_are_of_one_kind_and_within_limits() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        let mut events = Vec::new();
        for i in 0..30 {
            events.push(ev(i, if (i / 10) % 2 == 0 { Kind::Stateful } else { Kind::Stateless }));
        }
        q.append(&events).unwrap();
        q.sync().unwrap();
        let one = ev(0, Kind::Stateful).wire_len();
        let limits = BatchLimits { max_events: 1000, max_bytes: 100 + one * 4, overhead: 100 };
        let mut sizes = Vec::new();
        while let Some(b) = q.next_batch(limits).unwrap() {
            assert!(b.events.iter().all(|e| e.kind == b.kind));
            sizes.push(b.events.len());
            q.ack(Ack { end: b.end, records: b.events.len() as u64, frame_bytes: b.frame_bytes }).unwrap();
        }
        assert_eq!(sizes, vec![4, 4, 2, 4, 4, 2, 4, 4, 2]);
    }

    #[test]
    fn segments_roll_and_are_deleted_only_after_the_cursor_passes() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        let events: Vec<Event> = (0..20).map(|i| sized(i, 500_000)).collect();
        q.append(&events).unwrap();
        q.sync().unwrap();
        let segs = || {
            fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
                .count()
        };
        assert!(segs() >= 3, "{} segments", segs());
        let got = drain(&mut q, BatchLimits { max_events: 3, max_bytes: 16 << 20, overhead: 0 });
        assert_eq!(got, events);
        assert_eq!(segs(), 1, "delivered segments deleted, the active one kept");
        drop(q);
        let mut q = open(dir.path());
        assert_eq!(q.backlog(), (0, 0));
        assert!(q.next_batch(LIMITS).unwrap().is_none());
    }

    /// Found by `make bench` (a backlog drained while producers kept appending): records
    /// appended to a segment after it was loaded and before it was sealed were skipped.
    #[test]
    fn records_appended_to_a_loaded_segment_before_it_rolls_are_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        let one = BatchLimits { max_events: 1, ..LIMITS };
        let (e1, e2, e3) = (sized(1, 10), sized(2, 10), sized(3, 10));
        q.append(&[e1.clone(), e2.clone()]).unwrap();
        q.sync().unwrap();
        // Loads the active segment (e1, e2) and hands out e1 only.
        let b = q.next_batch(one).unwrap().unwrap();
        assert_eq!(b.events, [e1]);
        q.ack(Ack { end: b.end, records: 1, frame_bytes: b.frame_bytes }).unwrap();
        // e3 lands in the same segment, then a big record seals it.
        let big = sized(4, SEGMENT_MAX as usize);
        q.append(&[e3.clone(), big.clone()]).unwrap();
        q.sync().unwrap();
        assert_eq!(drain(&mut q, one), [e2, e3, big]);
        assert_eq!(q.backlog(), (0, 0));
    }

    /// Appends, syncs, batches of random limits, acks (or not) and restarts, interleaved at
    /// random, against a model: everything appended is handed out exactly once, in order,
    /// except batches not acked before a restart, which come back.
    #[test]
    fn interleaved_appends_reads_acks_and_restarts_match_the_model() {
        for seed in 0..24 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let dir = tempfile::tempdir().unwrap();
            let mut q = open(dir.path());
            let mut appended: Vec<Event> = Vec::new();
            let mut acked = 0usize; // appended[..acked] delivered for good
            let mut handed = 0usize; // appended[..handed] handed out since the last restart
            let mut synced = 0usize;
            let mut next_id = 0;
            for _ in 0..200 {
                match rng.u8(0..10) {
                    0..=3 => {
                        let n = rng.usize(1..20);
                        let batch: Vec<Event> = (0..n)
                            .map(|_| {
                                next_id += 1;
                                // Mostly small records, sometimes ones that fill a segment fast.
                                let pad =
                                    if rng.u8(0..20) == 0 { rng.usize(100_000..400_000) } else { rng.usize(0..300) };
                                sized(next_id, pad)
                            })
                            .collect();
                        assert_eq!(q.append(&batch).unwrap(), n);
                        appended.extend(batch);
                    }
                    4 => {
                        q.sync().unwrap();
                        synced = appended.len();
                    }
                    5..=8 => {
                        let limits = BatchLimits { max_events: rng.usize(1..30), max_bytes: 1 << 22, overhead: 0 };
                        match q.next_batch(limits).unwrap() {
                            Some(b) => {
                                let n = b.events.len();
                                assert_eq!(b.events, appended[handed..handed + n], "seed {seed}");
                                handed += n;
                                // Some batches stay unacked: a restart hands them out again.
                                if rng.bool() {
                                    q.ack(Ack { end: b.end, records: n as u64, frame_bytes: b.frame_bytes }).unwrap();
                                    acked = handed;
                                }
                            }
                            // A roll syncs too, so more than `synced` may be durable.
                            None => assert!(handed >= synced, "seed {seed}: durable records not handed out"),
                        }
                    }
                    _ => {
                        q.sync().unwrap();
                        drop(q);
                        q = open(dir.path());
                        // Everything not acked is the backlog, and is handed out again.
                        assert_eq!(q.backlog().0 as usize, appended.len() - acked, "seed {seed}");
                        handed = acked;
                        synced = appended.len();
                    }
                }
            }
            q.sync().unwrap();
            let rest = drain(&mut q, BatchLimits { max_events: 7, max_bytes: 1 << 22, overhead: 0 });
            assert_eq!(rest, appended[handed..], "seed {seed}");
        }
    }

    #[test]
    fn cap_stores_the_prefix_that_fits() {
        let dir = tempfile::tempdir().unwrap();
        let one = format::frame_len(&ev(0, Kind::Stateful)) as u64;
        let mut q = QueueStore::open(dir.path(), one * 3, Arc::new(Stats::default())).unwrap();
        assert_eq!(q.append(&[ev(0, Kind::Stateful), ev(1, Kind::Stateful)]).unwrap(), 2);
        assert_eq!(q.append(&[ev(2, Kind::Stateful), ev(3, Kind::Stateful)]).unwrap(), 1);
        assert_eq!(q.append(&[ev(4, Kind::Stateful)]).unwrap(), 0);
        q.sync().unwrap();
        assert_eq!(drain(&mut q, LIMITS), vec![ev(0, Kind::Stateful), ev(1, Kind::Stateful), ev(2, Kind::Stateful)]);
        assert_eq!(q.append(&[ev(4, Kind::Stateful)]).unwrap(), 1, "room again once delivered");
    }

    #[test]
    fn torn_tail_is_dropped_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<Event> = (0..5).map(|i| ev(i, Kind::Stateful)).collect();
        {
            let mut q = open(dir.path());
            q.append(&events).unwrap();
            q.sync().unwrap();
        }
        let seg = dir.path().join(seg_name(0));
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 7).unwrap();
        let mut q = open(dir.path());
        assert_eq!(q.backlog().0, 4);
        q.append(&[ev(9, Kind::Stateful)]).unwrap();
        q.sync().unwrap();
        let got = drain(&mut q, LIMITS);
        let mut want = events[..4].to_vec();
        want.push(ev(9, Kind::Stateful));
        assert_eq!(got, want);
    }

    #[test]
    fn damaged_cursor_redelivers_instead_of_losing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut q = open(dir.path());
            q.append(&[ev(0, Kind::Stateful), ev(1, Kind::Stateful)]).unwrap();
            q.sync().unwrap();
            let b = q.next_batch(BatchLimits { max_events: 1, ..LIMITS }).unwrap().unwrap();
            q.ack(Ack { end: b.end, records: 1, frame_bytes: b.frame_bytes }).unwrap();
        }
        fs::write(dir.path().join("cursor"), b"garbage").unwrap();
        let mut q = open(dir.path());
        assert_eq!(drain(&mut q, LIMITS).len(), 2);
    }

    #[test]
    fn a_failed_write_refuses_the_whole_round_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        q.append(&[ev(0, Kind::Stateful)]).unwrap();
        q.sync().unwrap();
        // A read-only handle on the active segment: the next write fails.
        q.active = File::open(dir.path().join(seg_name(0))).unwrap();
        let (tx, rx) = crossbeam_channel::bounded(4);
        let replies: Vec<_> = (1..4)
            .map(|i| {
                let (reply, answer) = crossbeam_channel::bounded(1);
                tx.send(Append { events: vec![ev(i, Kind::Stateful)], reply }).unwrap();
                answer
            })
            .collect();
        let first = rx.recv().unwrap();
        serve_appends(&mut q, first, &rx);
        for r in replies {
            let a = r.recv().unwrap();
            assert_eq!(a.stored, 0);
            assert!(matches!(a.error, Some(QueueError::Io { .. })), "{a:?}");
        }
        assert_eq!(q.backlog().0, 1);
        drop(q);
        assert_eq!(drain(&mut open(dir.path()), LIMITS), [ev(0, Kind::Stateful)]);
    }

    /// A stateless event whose lines are `n` bytes long.
    fn lines_of(n: usize) -> Event {
        let header = r#"{"module":"m"}"#;
        Event::new(Kind::Stateless, header, Some(&"x".repeat(n - header.len() - 1)))
    }

    /// Measured: a record over the reader's limit was acknowledged, then skipped as damaged.
    #[test]
    fn a_record_too_large_to_read_back_is_refused_not_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        let (small, big) = (ev(0, Kind::Stateful), lines_of(crate::event::MAX_RECORD_BYTES + 1));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (reply, answer) = crossbeam_channel::bounded(1);
        tx.send(Append { events: vec![small.clone(), big, ev(1, Kind::Stateful)], reply }).unwrap();
        serve_appends(&mut q, rx.recv().unwrap(), &rx);
        let a = answer.recv().unwrap();
        assert_eq!(a.stored, 1, "stored up to the record too large");
        assert!(matches!(a.error, Some(QueueError::TooLarge)), "{a:?}");
        assert_eq!(q.backlog().0, 1);
        drop(q);
        assert_eq!(drain(&mut open(dir.path()), LIMITS), [small]);
    }

    /// Measured: 255 events spilled under the cap were logged and counted as lost with the rest.
    #[test]
    fn a_spill_counts_exactly_what_it_could_not_save() {
        let dir = tempfile::tempdir().unwrap();
        let one = lines_of(1000);
        let mut q =
            QueueStore::open(dir.path(), format::frame_len(&one) as u64 * 3, Arc::new(Stats::default())).unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let server = std::thread::spawn(move || {
            serve_appends(&mut q, rx.recv().unwrap(), &rx);
            q
        });
        // 3 of the 5 that fit under the cap are saved; the 2 others and the too large one are lost.
        let mut events = vec![one.clone(); 5];
        events.insert(1, lines_of(crate::event::MAX_RECORD_BYTES + 1));
        let stats = Stats::default();
        spill(&tx, events, &stats, "test");
        assert_eq!(stats.dropped.load(Relaxed), 3);
        assert_eq!(server.join().unwrap().backlog().0, 3);
    }

    #[test]
    fn group_commit_through_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        let (append_tx, append_rx) = crossbeam_channel::bounded(64);
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
        let (batch_tx, batch_rx) = crossbeam_channel::bounded(0);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let t = std::thread::spawn(move || run(q, append_rx, ack_rx, batch_tx, stop_rx, || LIMITS));
        let replies: Vec<_> = (0..10)
            .map(|i| {
                let (tx, rx) = crossbeam_channel::bounded(1);
                append_tx.send(Append { events: vec![ev(i, Kind::Stateful)], reply: tx }).unwrap();
                rx
            })
            .collect();
        for r in replies {
            assert!(r.recv().unwrap().all_stored(1));
        }
        let mut got = 0;
        while got < 10 {
            let b = batch_rx.recv().unwrap();
            got += b.events.len();
            ack_tx.send(Ack { end: b.end, records: b.events.len() as u64, frame_bytes: b.frame_bytes }).unwrap();
        }
        drop(stop_tx);
        t.join().unwrap();
        assert_eq!(open(dir.path()).backlog(), (0, 0));
    }
}
