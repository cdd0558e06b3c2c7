//! The uploader threads: the only code that talks to the events endpoints.
//!
//! Each takes one batch at a time: `uploader` from the durable queue and the batcher
//! (chosen fairly by `select!`, so neither kind starves the other), `uploader2` from the
//! batcher only (so stateful batches stay in order, one in flight). Each batch is
//! delivered with the rules of docs/protocol.md, Events, through [`http::classify`]:
//!
//! * 2xx: delivered (the queue's cursor moves on);
//! * 401/403: ask the token thread for a new token, resend;
//! * 408/429/5xx/transport: resend after full-jitter backoff (or `Retry-After`);
//! * 413: split in halves; 400: bisect down to the offending events, which go to
//!   `<data_dir>/rejected.ndjson` with the server's reason, and deliver the rest.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, select};
use serde::Deserialize;

use crate::backoff::Backoff;
use crate::config::{Compression, RetryConfig};
use crate::event::{BodyReader, Event, Kind};
use crate::http::{self, Attempt, Outcome, Rejection};
use crate::live::Live;
use crate::queue::{Ack, Append, QueueBatch};
use crate::status::{self, Stats};
use crate::token::TokenCell;

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

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn record(&self, kind: Kind, status: u16, reason: &str, e: &Event) {
        if fs::metadata(&self.path).is_ok_and(|m| m.len() > REJECTED_MAX_BYTES) {
            let _ = fs::rename(&self.path, self.path.with_extension("ndjson.1"));
        }
        let endpoint = if kind == Kind::Stateful { "stateful" } else { "stateless" };
        // header and data are valid JSON already; the rest is escaped by serde_json.
        let line = format!(
            "{{\"time\":{},\"endpoint\":\"{endpoint}\",\"status\":{status},\"reason\":{},\"header\":{},\"data\":{}}}\n",
            serde_json::Value::String(status::rfc3339(SystemTime::now())),
            serde_json::Value::String(reason.to_string()),
            e.header(),
            e.data().unwrap_or("null"),
        );
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(err) = written {
            log::error!("cannot record a rejected event in {}: {err}", self.path.display());
        }
    }
}

#[derive(Deserialize)]
struct StatefulResults {
    #[serde(default)]
    results: Vec<ItemResult>,
}

#[derive(Deserialize)]
struct ItemResult {
    #[serde(default)]
    status: u16,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    result: Option<String>,
}

/// Everything the uploader needs, owned by its thread.
pub struct Uploader {
    pub agent: ureq::Agent,
    pub cell: Arc<TokenCell>,
    /// The agent line (groups) and the retry settings can change while running.
    pub live: Arc<Live>,
    pub compression: Compression,
    pub request_timeout: Duration,
    pub stats: Arc<Stats>,
    pub rejected: RejectedLog,
    pub shutdown: Receiver<()>,
    pub deadline: Arc<OnceLock<Instant>>,
}

impl Uploader {
    fn draining(&self) -> bool {
        self.deadline.get().is_some()
    }

    fn past_deadline(&self) -> bool {
        self.deadline.get().is_some_and(|d| Instant::now() >= *d)
    }

    /// Waits `d`, cut short by the shutdown deadline. Returns false if the deadline passed.
    fn pause(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        if self.deadline.get().is_none() {
            // Returns early when shutdown begins (the channel closes).
            let _ = self.shutdown.recv_deadline(until);
        }
        if let Some(end) = self.deadline.get() {
            let stop = until.min(*end);
            let now = Instant::now();
            if stop > now {
                std::thread::sleep(stop - now);
            }
        }
        !self.past_deadline()
    }

    /// The gzip body, built once per batch; `None`: the body is streamed from the events.
    fn gzip_body(&self, agent_line: &str, events: &[Event]) -> Option<Vec<u8>> {
        match self.compression {
            Compression::None => None,
            Compression::Gzip => {
                let raw = BodyReader::len(agent_line, events) as usize;
                // Level 1: most of the size win for a fraction of the CPU on a small host.
                let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(raw / 4), flate2::Compression::fast());
                // Compressing from memory into memory cannot fail.
                let _ = std::io::copy(&mut BodyReader::new(agent_line, events), &mut enc);
                enc.finish().ok()
            }
        }
    }

    /// Delivers `events` to the endpoint of `kind`, isolating what the server refuses.
    pub fn deliver(&mut self, kind: Kind, events: &[Event]) -> Delivery {
        if events.is_empty() {
            return Delivery::Done;
        }
        let endpoint = if kind == Kind::Stateful { "stateful" } else { "stateless" };
        let view = self.live.view();
        let retry: RetryConfig = view.config.retry.clone();
        let gzipped = self.gzip_body(&view.agent_line, events);
        let mut backoff = Backoff::new(retry.initial, retry.max);
        loop {
            if self.past_deadline() {
                return Delivery::Aborted;
            }
            let token = match self.cell.current() {
                Some(t) => t,
                None => {
                    if self.cell.wait_newer(0, Duration::from_millis(500)).is_none() && self.past_deadline() {
                        return Delivery::Aborted;
                    }
                    continue;
                }
            };
            let url = format!("{}/api/v1/events/{endpoint}", token.server);
            let timeout = match self.deadline.get() {
                Some(d) => {
                    self.request_timeout.min(d.saturating_duration_since(Instant::now())).max(Duration::from_millis(1))
                }
                None => self.request_timeout,
            };
            let body = match &gzipped {
                Some(z) => Body::Gzip(z),
                None => Body::Stream(&view.agent_line, events),
            };
            let result = send_events(&self.agent, &url, &token.bearer(), body, timeout);
            let outcome = http::classify(Attempt::of(&result), SystemTime::now(), retry.max);
            match outcome {
                Outcome::Done => {
                    self.stats.connected.store(true, Ordering::Relaxed);
                    if let (Kind::Stateful, Ok(reply)) = (kind, &result) {
                        self.count_item_failures(reply, events.len());
                    }
                    Stats::add(&self.stats.sent, events.len() as u64);
                    Stats::add(&self.stats.batches_sent, 1);
                    return Delivery::Done;
                }
                Outcome::Reauth => {
                    Stats::add(&self.stats.retries, 1);
                    self.cell.refused(token.generation);
                    let wait = self
                        .deadline
                        .get()
                        .map_or(Duration::from_secs(30), |d| d.saturating_duration_since(Instant::now()));
                    self.cell.wait_newer(token.generation, wait);
                }
                Outcome::Retry { after, .. } => {
                    Stats::add(&self.stats.retries, 1);
                    Stats::add(&self.stats.batches_failed, 1);
                    let why = match &result {
                        Ok(r) => format!("{} {}", r.status, r.message()),
                        Err(e) => {
                            self.stats.connected.store(false, Ordering::Relaxed);
                            http::describe_transport(e)
                        }
                    };
                    let delay = after.unwrap_or_else(|| backoff.next_delay());
                    log::warn!(
                        "{endpoint} batch of {} events not delivered ({why}); retrying in {}ms",
                        events.len(),
                        delay.as_millis()
                    );
                    self.stats.set_error(format!("{url}: {why}"));
                    if !self.pause(delay) {
                        return Delivery::Aborted;
                    }
                }
                Outcome::Reject(Rejection::Invalid | Rejection::TooLarge) => {
                    let Ok(reply) = &result else { continue };
                    let status = reply.status;
                    let reason = reply.message();
                    if events.len() == 1 {
                        log::warn!(
                            "the server refused an event ({status} {reason}); recorded in {}",
                            self.rejected.path().display()
                        );
                        self.rejected.record(kind, status, &reason, &events[0]);
                        Stats::add(&self.stats.rejected, 1);
                        Stats::add(&self.stats.batches_failed, 1);
                        return Delivery::Done;
                    }
                    // Halve: the good half goes through, the bad one is halved again.
                    log::info!("{endpoint} batch of {} events refused ({status} {reason}); splitting it", events.len());
                    let (a, b) = events.split_at(events.len() / 2);
                    if self.deliver(kind, a) == Delivery::Aborted {
                        return Delivery::Aborted;
                    }
                    return self.deliver(kind, b);
                }
                Outcome::Reject(Rejection::Other(code)) => {
                    // Not an answer about the events (404 on a wrong URL, 405 …): never drop
                    // them for it; keep retrying slowly and say what is wrong.
                    Stats::add(&self.stats.retries, 1);
                    let msg = result.as_ref().map(|r| r.message()).unwrap_or_default();
                    let delay = backoff.next_delay().max(retry.max / 2);
                    log::error!("{url} answered {code} {msg}; check server.url; retrying in {}ms", delay.as_millis());
                    self.stats.set_error(format!("{url}: {code} {msg}"));
                    if !self.pause(delay) {
                        return Delivery::Aborted;
                    }
                }
            }
        }
    }

    fn count_item_failures(&self, reply: &http::Reply, n: usize) {
        let Ok(parsed) = serde_json::from_slice::<StatefulResults>(&reply.body) else {
            log::debug!("stateful answer without a results list ({} events)", n);
            return;
        };
        let failed: Vec<&ItemResult> = parsed.results.iter().filter(|r| r.status >= 300).collect();
        if failed.is_empty() {
            return;
        }
        Stats::add(&self.stats.rejected, failed.len() as u64);
        for f in failed.iter().take(3) {
            log::warn!(
                "the server did not apply a stateful event (id {}, status {}, {})",
                f.id.as_deref().unwrap_or("?"),
                f.status,
                f.result.as_deref().unwrap_or("no result")
            );
        }
        if failed.len() > 3 {
            log::warn!("… and {} more stateful events not applied", failed.len() - 3);
        }
    }
}

/// A request body: compressed bytes, or the plain body streamed from the events.
enum Body<'a> {
    Gzip(&'a [u8]),
    Stream(&'a str, &'a [Event]),
}

fn send_events(
    agent: &ureq::Agent,
    url: &str,
    bearer: &str,
    body: Body<'_>,
    timeout: Duration,
) -> Result<http::Reply, ureq::Error> {
    let req = agent.post(url).header("Authorization", bearer).header("Content-Type", "application/json");
    let mut response = match body {
        Body::Gzip(z) => {
            req.header("Content-Encoding", "gzip").config().timeout_global(Some(timeout)).build().send(z)?
        }
        Body::Stream(agent_line, events) => {
            let mut reader = BodyReader::new(agent_line, events);
            // An explicit Content-Length: ureq would send a reader chunked otherwise.
            req.header("Content-Length", BodyReader::len(agent_line, events).to_string())
                .config()
                .timeout_global(Some(timeout))
                .build()
                .send(ureq::SendBody::from_reader(&mut reader))?
        }
    };
    http::read_reply(&mut response)
}

/// The durable queue's side of an uploader: batches in, acks back to the queue thread.
pub struct QueueLink {
    pub batches: Receiver<QueueBatch>,
    pub acks: Sender<Ack>,
}

/// The uploader thread's loop. Stops when `shutdown` has closed and either the
/// deadline passed or both inputs are done. An uploader without a [`QueueLink`] delivers
/// stateless batches only.
pub fn run(mut up: Uploader, stateless: Receiver<Vec<Event>>, queue: Option<QueueLink>, spill: Sender<Append>) {
    let never_events = crossbeam_channel::never::<Vec<Event>>();
    let never_batches = crossbeam_channel::never::<QueueBatch>();
    let never_stop = crossbeam_channel::never::<()>();
    let mut stateless_open = true;
    let mut queued_open = queue.is_some();
    loop {
        let s_in = if stateless_open { &stateless } else { &never_events };
        let q_in = match &queue {
            Some(link) if queued_open => &link.batches,
            _ => &never_batches,
        };
        let stop = if up.draining() { &never_stop } else { &up.shutdown };
        // While draining, give up after a short idle period once the batcher is done.
        let idle = if up.draining() {
            if !stateless_open || up.past_deadline() { Duration::from_millis(50) } else { Duration::from_millis(200) }
        } else {
            Duration::from_secs(3600)
        };
        select! {
            recv(q_in) -> msg => match msg {
                Ok(batch) => {
                    let n = batch.events.len() as u64;
                    match up.deliver(batch.kind, &batch.events) {
                        Delivery::Done => {
                            // A queue batch only arrives through a link (`q_in` is `never` without one).
                            let Some(link) = &queue else { break };
                            let ack = Ack { end: batch.end, records: n, frame_bytes: batch.frame_bytes };
                            if link.acks.send(ack).is_err() {
                                break;
                            }
                        }
                        // Still in the queue (cursor not moved): delivered after the next start.
                        Delivery::Aborted => break,
                    }
                }
                Err(_) => queued_open = false,
            },
            recv(s_in) -> msg => match msg {
                Ok(events) => {
                    if up.deliver(Kind::Stateless, &events) == Delivery::Aborted {
                        crate::queue::spill(&spill, events, &up.stats, "in flight");
                        break;
                    }
                }
                Err(_) => stateless_open = false,
            },
            recv(stop) -> _ => {
                // The supervisor set the deadline before closing the channel.
                if up.deadline.get().is_none() {
                    let _ = up.deadline.set(Instant::now());
                }
            },
            default(idle) => {
                if up.draining() {
                    break;
                }
            }
        }
        if up.draining() && up.past_deadline() {
            // Whatever the batcher still holds it spills itself.
            break;
        }
        if !stateless_open && !queued_open {
            break;
        }
    }
}
