//! The uploader threads: the only code that talks to the events endpoints.
//!
//! Each takes one batch at a time: [`run_queue`] from the durable queue and the batcher,
//! [`run_stateless`] from the batcher only (so stateful batches stay in order, one in flight).
//! Its [`Session`] delivers a batch (docs/protocol.md, Events); this file splits what the server
//! refuses (413: in halves; 400: down to the offending events, kept in `<data_dir>/rejected.ndjson`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, never, select};
use serde::Deserialize;

use crate::config::Compression;
use crate::event::{BodyReader, Event, Kind};
use crate::http::{self, Request};
use crate::queue::{Ack, Append, QueueBatch};
use crate::session::{Call, Failure, Session};
use crate::status::{self, Stats};

/// `rejected.ndjson` is rotated to `rejected.ndjson.1` past this size (bounded disk use).
pub const REJECTED_MAX_BYTES: u64 = 10 << 20;

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Nothing more to do for these events (sent, or isolated as rejected).
    Done,
    /// Shutdown's deadline passed before the server took them.
    Aborted,
}

/// `<data_dir>/rejected.ndjson`: events the server refused for good, with the reason.
pub struct RejectedLog {
    path: PathBuf,
}

impl RejectedLog {
    pub fn new(data_dir: &std::path::Path) -> RejectedLog {
        RejectedLog { path: data_dir.join("rejected.ndjson") }
    }

    fn record(&self, endpoint: &str, status: u16, reason: &str, e: &Event) {
        if fs::metadata(&self.path).is_ok_and(|m| m.len() > REJECTED_MAX_BYTES) {
            let _ = fs::rename(&self.path, self.path.with_extension("ndjson.1"));
        }
        // header and data are valid JSON already; the rest is escaped by serde_json.
        let line = format!(
            "{{\"time\":{},\"endpoint\":\"{endpoint}\",\"status\":{status},\"reason\":{},\"header\":{},\"data\":{}}}\n",
            serde_json::Value::String(status::rfc3339(SystemTime::now())),
            serde_json::Value::String(reason.to_string()),
            e.header(),
            e.data().unwrap_or("null"),
        );
        let file = OpenOptions::new().create(true).append(true).open(&self.path);
        if let Err(err) = file.and_then(|mut f| f.write_all(line.as_bytes())) {
            log::error!("cannot record a rejected event in {}: {err}", self.path.display());
        }
    }
}

#[derive(Deserialize)]
struct StatefulResults {
    #[serde(default)]
    results: Vec<ItemResult>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ItemResult {
    status: u16,
    id: Option<String>,
    result: Option<String>,
}

/// Everything an uploader needs, owned by its thread.
pub struct Uploader {
    /// An events session that drains until `deadline`.
    pub session: Session,
    pub rejected: RejectedLog,
    /// Closed when shutdown begins; delivery then goes on until `deadline`.
    pub shutdown: Receiver<()>,
    pub deadline: Arc<OnceLock<Instant>>,
}

impl Uploader {
    fn draining(&self) -> bool {
        self.deadline.get().is_some()
    }

    /// Past the deadline, whatever the batcher still holds it spills itself.
    fn past_deadline(&self) -> bool {
        self.deadline.get().is_some_and(|d| Instant::now() >= *d)
    }

    /// The supervisor sets the deadline before closing the channel; the fallback keeps one set.
    fn begin_drain(&self) {
        let _ = self.deadline.set(Instant::now());
    }

    /// How long to wait for input: while draining, give up soon once the batcher is done.
    fn idle(&self, stateless_done: bool) -> Duration {
        match (self.draining(), stateless_done || self.past_deadline()) {
            (false, _) => Duration::from_secs(3600),
            (true, true) => Duration::from_millis(50),
            (true, false) => Duration::from_millis(200),
        }
    }

    /// The body: streamed from the events, or compressed with gzip (once per batch).
    fn body<'a>(compression: Compression, agent_line: &'a str, events: &'a [Event]) -> Request<'a> {
        if compression == Compression::None {
            return Request::Events(agent_line, events);
        }
        let raw = BodyReader::len(agent_line, events) as usize;
        // Level 1: most of the size win for a fraction of the CPU on a small host.
        let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(raw / 4), flate2::Compression::fast());
        // Compressing from memory into memory cannot fail.
        let _ = std::io::copy(&mut BodyReader::new(agent_line, events), &mut enc);
        enc.finish().map_or(Request::Events(agent_line, events), Request::Gzip)
    }

    /// Delivers `events` to the endpoint of `kind`, isolating what the server refuses. Each
    /// event is settled once, where its delivery ends (its source may then move past it).
    pub fn deliver(&self, kind: Kind, events: &[Event]) -> Delivery {
        if events.is_empty() {
            return Delivery::Done;
        }
        let endpoint = if kind == Kind::Stateful { "stateful" } else { "stateless" };
        let view = self.session.live.view();
        let request = Self::body(view.config.server.compression, &view.agent_line, events);
        let (path, what) =
            (format!("/api/v1/events/{endpoint}"), format!("{endpoint} batch of {} events", events.len()));
        let stats = &self.session.stats;
        match self.session.call(&Call { path: &path, request, what: &what, until: None }) {
            Ok(reply) => {
                if kind == Kind::Stateful {
                    self.count_item_failures(&reply, events.len());
                }
                Stats::add(&stats.sent, events.len() as u64);
                Stats::add(&stats.batches_sent, 1);
                events.iter().for_each(Event::settle);
                Delivery::Done
            }
            Err(Failure::Stopped) => Delivery::Aborted,
            Err(Failure::Refused { status, message, .. }) if events.len() == 1 => {
                let path = self.rejected.path.display();
                log::warn!("the server refused an event ({status} {message}); recorded in {path}");
                self.rejected.record(endpoint, status, &message, &events[0]);
                Stats::add(&stats.rejected, 1);
                Stats::add(&stats.batches_failed, 1);
                events[0].settle();
                Delivery::Done
            }
            Err(Failure::Refused { status, message, .. }) => {
                // 400/413: halve; the good half goes through, the bad one is halved again.
                log::info!("{endpoint} batch of {} events refused ({status} {message}); splitting it", events.len());
                let (a, b) = events.split_at(events.len() / 2);
                if self.deliver(kind, a) == Delivery::Aborted {
                    return Delivery::Aborted;
                }
                self.deliver(kind, b)
            }
        }
    }

    /// A stateless batch; false: the deadline passed first (the events are spilled), stop.
    fn stateless(&self, events: Vec<Event>, spill: &Sender<Append>) -> bool {
        if self.deliver(Kind::Stateless, &events) == Delivery::Aborted {
            crate::queue::spill(spill, events, &self.session.stats, "in flight");
            return false;
        }
        true
    }

    fn count_item_failures(&self, reply: &http::Reply, n: usize) {
        let Ok(parsed) = serde_json::from_slice::<StatefulResults>(&reply.body) else {
            log::debug!("stateful answer without a results list ({} events)", n);
            return;
        };
        let failed: Vec<&ItemResult> = parsed.results.iter().filter(|r| r.status >= 300).collect();
        Stats::add(&self.session.stats.rejected, failed.len() as u64);
        for f in failed.iter().take(3) {
            let (id, result) = (f.id.as_deref().unwrap_or("?"), f.result.as_deref().unwrap_or("no result"));
            log::warn!("the server did not apply a stateful event (id {id}, status {}, {result})", f.status);
        }
        if failed.len() > 3 {
            log::warn!("… and {} more stateful events not applied", failed.len() - 3);
        }
    }
}

/// The durable queue's side of an uploader: batches in, acks back to the queue thread.
pub struct QueueLink {
    pub batches: Receiver<QueueBatch>,
    pub acks: Sender<Ack>,
}

/// The `upload-queue` thread: the durable queue's batches, one at a time and in order,
/// and stateless batches in between (chosen fairly by `select!`, so neither kind starves
/// the other). Stops once `shutdown` closed and the deadline passed or both inputs are done.
pub fn run_queue(up: Uploader, queue: QueueLink, stateless: Receiver<Vec<Event>>, spill: Sender<Append>) {
    let (never_events, never_batches, never_stop) = (never(), never(), never());
    let (mut stateless_open, mut queued_open) = (true, true);
    loop {
        let s_in = if stateless_open { &stateless } else { &never_events };
        let q_in = if queued_open { &queue.batches } else { &never_batches };
        let stop = if up.draining() { &never_stop } else { &up.shutdown };
        select! {
            recv(q_in) -> msg => match msg {
                Ok(batch) => {
                    let ack = Ack { end: batch.end, records: batch.events.len() as u64, frame_bytes: batch.frame_bytes };
                    // Aborted: still in the queue (cursor not moved), delivered after the next start.
                    if up.deliver(batch.kind, &batch.events) == Delivery::Aborted || queue.acks.send(ack).is_err() {
                        break;
                    }
                }
                Err(_) => queued_open = false,
            },
            recv(s_in) -> msg => match msg {
                Ok(events) => if !up.stateless(events, &spill) { break },
                Err(_) => stateless_open = false,
            },
            recv(stop) -> _ => up.begin_drain(),
            default(up.idle(!stateless_open)) => if up.draining() { break },
        }
        if up.past_deadline() || (!stateless_open && !queued_open) {
            break;
        }
    }
}

/// The `upload-stateless` thread: stateless batches only (they may then arrive out of order; the
/// durable queue's never do). Stops like [`run_queue`].
pub fn run_stateless(up: Uploader, stateless: Receiver<Vec<Event>>, spill: Sender<Append>) {
    let never_stop = never();
    loop {
        let stop = if up.draining() { &never_stop } else { &up.shutdown };
        select! {
            recv(stateless) -> msg => match msg {
                Ok(events) => if !up.stateless(events, &spill) { break },
                Err(_) => break,
            },
            recv(stop) -> _ => up.begin_drain(),
            default(up.idle(false)) => if up.draining() { break },
        }
        if up.past_deadline() {
            break;
        }
    }
}
