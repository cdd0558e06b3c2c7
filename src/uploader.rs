//! The uploader threads, [`run_queue`] and [`run_stateless`] (ARCHITECTURE.md, Invariants): each
//! delivers one batch at a time through its [`Session`] (docs/protocol.md, Events) and splits what the
//! server refuses (413: in halves; 400: down to the offending events, kept in `rejected.ndjson`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, never, select};
use serde::Deserialize;
use serde_json::Value;

use crate::config::Compression;
use crate::event::{Event, Kind};
use crate::http::{self, Request};
use crate::queue::{Ack, Append, QueueBatch};
use crate::session::{Call, Failure, Session};
use crate::status::{self, Stats};

/// `rejected.ndjson` is rotated to `rejected.ndjson.1` past this size (bounded disk use).
pub const REJECTED_MAX_BYTES: u64 = 10 << 20;

#[derive(Deserialize)]
struct Target {
    module: String,
    operation: String,
    id: String,
}

/// What becomes of a stateful event: `Gone` is a delete of an id the server does not have (what
/// it wanted); `Heal(op)` is sent again as `op`; `Rejected` is recorded in `rejected.ndjson`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    Gone,
    Heal(&'static str),
    Rejected,
}

/// One item (an update carries the whole document). `heal` is false for the follow-up request.
fn outcome(operation: &str, status: u64, heal: bool) -> Outcome {
    match (operation, status) {
        (_, 0..300) => Outcome::Applied,
        ("delete", 404) => Outcome::Gone,
        ("update", 404) if heal => Outcome::Heal("create"),
        ("create", 409) if heal => Outcome::Heal("update"),
        _ => Outcome::Rejected,
    }
}

/// Result `i` is event `i`'s if it names its id, or none in a list of one per event (else: applied,
/// as the 2xx says). An event whose id comes again later in the batch is not healed: that one wins.
fn outcomes(events: &[Event], results: &[Value], heal: bool) -> Vec<Outcome> {
    let targets: Vec<Option<Target>> = events.iter().map(|e| serde_json::from_str(e.header()).ok()).collect();
    Vec::from_iter(targets.iter().enumerate().map(|(i, t)| {
        let (Some(t), Some(r)) = (t, results.get(i)) else { return Outcome::Applied };
        let heal = heal && t.module != "command"; // a command result's update is not a whole document
        match outcome(&t.operation, r.get("status").and_then(Value::as_u64).unwrap_or(0), heal) {
            Outcome::Heal(_) if targets[i + 1..].iter().flatten().any(|later| later.id == t.id) => Outcome::Applied,
            o if r.get("id").and_then(Value::as_str).map_or(results.len() == events.len(), |id| id == t.id) => o,
            _ => Outcome::Applied,
        }
    }))
}

/// Everything an uploader needs, owned by its thread.
pub struct Uploader {
    /// An events session that drains until `deadline`.
    pub session: Session,
    /// `<data_dir>/rejected.ndjson`: events the server refused for good, with the reason.
    pub rejected: PathBuf,
    /// Closed when shutdown begins; delivery then goes on until `deadline`.
    pub shutdown: Receiver<()>,
    pub deadline: Arc<OnceLock<Instant>>,
    /// To the queue: a stateless batch not delivered by the deadline.
    pub spill: Sender<Append>,
}

impl Uploader {
    /// Appends `e` to `rejected.ndjson` (rotated first past [`REJECTED_MAX_BYTES`]).
    fn record_rejected(&self, endpoint: &str, status: u16, reason: &str, e: &Event) {
        if fs::metadata(&self.rejected).is_ok_and(|m| m.len() > REJECTED_MAX_BYTES) {
            let _ = fs::rename(&self.rejected, self.rejected.with_extension("ndjson.1"));
        }
        // header and data are valid JSON already; the rest is escaped by serde_json.
        let line = format!(
            "{{\"time\":{},\"endpoint\":\"{endpoint}\",\"status\":{status},\"reason\":{},\"header\":{},\"data\":{}}}\n",
            serde_json::Value::String(status::rfc3339(SystemTime::now())),
            serde_json::Value::String(reason.to_string()),
            e.header(),
            e.data().unwrap_or("null"),
        );
        let file = OpenOptions::new().create(true).append(true).open(&self.rejected);
        if let Err(err) = file.and_then(|mut f| f.write_all(line.as_bytes())) {
            log::error!("cannot record a rejected event in {}: {err}", self.rejected.display());
        }
    }

    fn draining(&self) -> bool {
        self.deadline.get().is_some()
    }

    /// Past the deadline, whatever the batcher still holds it spills itself.
    fn past_deadline(&self) -> bool {
        self.deadline.get().is_some_and(|d| Instant::now() >= *d)
    }

    /// The body: streamed from the events, or compressed with gzip (once per batch).
    fn body<'a>(gzip: bool, agent_line: &'a str, events: &'a [Event]) -> Request<'a> {
        match gzip {
            // Without the feature the configuration check refuses server.compression = "gzip".
            #[cfg(feature = "gzip")]
            true => {
                use crate::event::BodyReader;
                let raw = BodyReader::len(agent_line, events) as usize;
                // Level 1: most of the size win for a fraction of the CPU on a small host.
                let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(raw / 4), flate2::Compression::fast());
                // Compressing from memory into memory cannot fail.
                let _ = std::io::copy(&mut BodyReader::new(agent_line, events), &mut enc);
                enc.finish().map_or(Request::Events(agent_line, events), |z| Request::Gzip(z, agent_line, events))
            }
            _ => Request::Events(agent_line, events),
        }
    }

    /// Delivers `events` to the endpoint of `kind`, isolating what the server refuses. Each event is settled once,
    /// where its delivery ends (its source may then move past it). `heal`: stateful per-item results may send events
    /// again (not in the follow-up itself). True when nothing more is to be done for them (sent, or isolated as
    /// rejected); false when shutdown's deadline passed before the server took them.
    fn deliver(&self, kind: Kind, events: &[Event], heal: bool) -> bool {
        if events.is_empty() {
            return true;
        }
        let endpoint = if kind == Kind::Stateful { "stateful" } else { "stateless" };
        let (view, stats) = (self.session.live.view(), &self.session.stats);
        // Once gzip fell back (session.rs) a body would be sent uncompressed anyway: spare the CPU.
        let gzip = view.config.server.compression == Compression::Gzip && stats.gzip_refused.get().is_none();
        let request = Self::body(gzip, &view.agent_line, events);
        let (path, what) =
            (format!("/api/v1/events/{endpoint}"), format!("{endpoint} batch of {} events", events.len()));
        match self.session.call(&Call { path: &path, request, what: &what, until: None }) {
            Ok(reply) => {
                Stats::add(&stats.batches_sent, 1);
                if kind == Kind::Stateful {
                    return self.stateful_results(&reply, events, heal);
                }
                Stats::add(&stats.sent, events.len() as u64);
                events.iter().for_each(Event::settle);
                true
            }
            Err(Failure::Stopped) => false,
            Err(Failure::Refused { status, message, .. }) if events.len() == 1 => {
                let path = self.rejected.display();
                log::warn!("the server refused an event ({status} {message}); recorded in {path}");
                self.record_rejected(endpoint, status, &message, &events[0]);
                Stats::add(&stats.rejected, 1);
                Stats::add(&stats.batches_failed, 1);
                events[0].settle();
                true
            }
            Err(Failure::Refused { status, message, .. }) => {
                // 400/413: halve; the good half goes through, the bad one is halved again.
                log::info!("{endpoint} batch of {} events refused ({status} {message}); splitting it", events.len());
                let (a, b) = events.split_at(events.len() / 2);
                self.deliver(kind, a, heal) && self.deliver(kind, b, heal)
            }
        }
    }

    /// A stateless batch; false: the deadline passed first (the events are spilled), stop.
    fn stateless(&self, events: Vec<Event>) -> bool {
        self.deliver(Kind::Stateless, &events, true) || {
            crate::queue::spill(&self.spill, events, &self.session.stats, "in flight");
            false
        }
    }

    /// A stateful batch the server took: its per-item results acted on (docs/protocol.md, Stateful results).
    fn stateful_results(&self, reply: &http::Reply, events: &[Event], heal: bool) -> bool {
        let body = serde_json::from_slice::<Value>(&reply.body).unwrap_or_default();
        let results = body.get("results").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
        let (outcomes, mut again) = (outcomes(events, results, heal), Vec::new());
        for ((e, o), r) in events.iter().zip(&outcomes).zip(results.iter().chain(std::iter::repeat(&Value::Null))) {
            if let Outcome::Heal(op) = o {
                if let Ok(Value::Object(mut header)) = serde_json::from_str(e.header()) {
                    header.insert("operation".into(), (*op).into()); // decoded and encoded, not edited as text
                    again.push(Event::new(Kind::Stateful, &Value::Object(header).to_string(), e.data()));
                }
            } else if *o == Outcome::Rejected {
                let status = r.get("status").and_then(Value::as_u64).unwrap_or(0).min(999) as u16;
                self.record_rejected("stateful", status, &r.to_string().chars().take(300).collect::<String>(), e);
            }
        }
        let count = |o: Outcome| outcomes.iter().filter(|x| **x == o).count();
        let (gone, failed) = (count(Outcome::Gone), count(Outcome::Rejected));
        if again.len() + gone + failed > 0 {
            let (n, creates, updates) = (events.len(), count(Outcome::Heal("create")), count(Outcome::Heal("update")));
            log::log!(
                if failed > 0 { log::Level::Warn } else { log::Level::Info },
                "stateful batch of {n}: {creates} updates of missing documents re-sent as creates, {updates} creates of existing documents re-sent as updates, {gone} deletes of missing documents counted as done, {failed} events not applied (see rejected.ndjson)"
            );
        }
        Stats::add(&self.session.stats.rejected, failed as u64);
        Stats::add(&self.session.stats.sent, (events.len() - failed - again.len()) as u64);
        events.iter().for_each(Event::settle); // (stateful events carry no receipt: only followed lines do)
        self.deliver(Kind::Stateful, &again, false)
    }
}

/// The `upload-queue` thread: the durable queue's batches, one at a time and in order, and stateless batches in between
/// (chosen fairly by `select!`, so neither kind starves the other); acks go back to the queue thread. Stops once
/// `shutdown` closed and the deadline passed or both inputs are done.
pub fn run_queue(up: Uploader, batches: Receiver<QueueBatch>, acks: Sender<Ack>, stateless: Receiver<Vec<Event>>) {
    let (never_events, never_batches, never_stop) = (never(), never(), never());
    let (mut stateless_open, mut queued_open) = (true, true);
    loop {
        let s_in = if stateless_open { &stateless } else { &never_events };
        let q_in = if queued_open { &batches } else { &never_batches };
        let stop = if up.draining() { &never_stop } else { &up.shutdown };
        // How long to wait for input: while draining, give up soon once the batcher is done.
        let idle = match (up.draining(), !stateless_open || up.past_deadline()) {
            (false, _) => Duration::from_secs(3600),
            (true, true) => Duration::from_millis(50),
            (true, false) => Duration::from_millis(200),
        };
        select! {
            recv(q_in) -> msg => match msg {
                Ok(batch) => {
                    let ack = Ack { end: batch.end, records: batch.events.len() as u64, frame_bytes: batch.frame_bytes };
                    // Not taken by the deadline: still in the queue (cursor not moved), delivered after the next start.
                    if !up.deliver(batch.kind, &batch.events, true) || acks.send(ack).is_err() {
                        break;
                    }
                }
                Err(_) => queued_open = false,
            },
            recv(s_in) -> msg => match msg {
                Ok(events) => if !up.stateless(events) { break },
                Err(_) => stateless_open = false,
            },
            // The supervisor sets the deadline before closing the channel; this fallback keeps one set.
            recv(stop) -> _ => { let _ = up.deadline.set(Instant::now()); }
            default(idle) => if up.draining() { break },
        }
        if up.past_deadline() || (!stateless_open && !queued_open) {
            break;
        }
    }
}

/// The `upload-stateless` thread: stateless batches only (they may then arrive out of order; the
/// durable queue's never do). Stops like [`run_queue`], whose queue input is closed here from the start.
pub fn run_stateless(up: Uploader, stateless: Receiver<Vec<Event>>) {
    let ((_, batches), (acks, _)) = (crossbeam_channel::bounded(0), crossbeam_channel::bounded(0));
    run_queue(up, batches, acks, stateless)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(op: &str, id: &str) -> Event {
        let header = format!(r#"{{"collector":"packages","id":"{id}","module":"inventory","operation":"{op}"}}"#);
        Event::new(Kind::Stateful, &header, (op != "delete").then_some(r#"{"package":{}}"#))
    }

    fn item(id: &str, status: u64) -> Value {
        json!({"index": "wazuh-states-inventory-packages", "id": id, "result": "r", "status": status})
    }

    #[test]
    fn each_item_is_done_healed_or_rejected() {
        use Outcome::*;
        for (op, status, heal, want) in [
            ("create", 201, true, Applied),
            ("update", 200, true, Applied),
            ("delete", 200, true, Applied),
            ("update", 404, true, Heal("create")),
            ("create", 409, true, Heal("update")),
            ("delete", 404, true, Gone),
            ("delete", 404, false, Gone),
            // The follow-up request heals nothing: a second failure is final.
            ("update", 404, false, Rejected),
            ("create", 409, false, Rejected),
            ("create", 404, true, Rejected),
            ("update", 409, true, Rejected),
            ("delete", 409, true, Rejected),
            ("create", 400, true, Rejected),
            ("update", 500, true, Rejected),
            ("create", 300, true, Rejected),
            ("create", u64::MAX, true, Rejected),
            ("create", 0, true, Applied),
        ] {
            assert_eq!(outcome(op, status, heal), want, "{op} {status} heal={heal}");
        }
    }

    #[test]
    fn results_are_matched_by_position_and_id() {
        use Outcome::*;
        let events = [ev("update", "a"), ev("create", "b"), ev("delete", "c"), ev("create", "d")];
        let results = [item("a", 404), item("b", 409), item("c", 404), item("d", 201)];
        assert_eq!(outcomes(&events, &results, true), [Heal("create"), Heal("update"), Gone, Applied]);
        assert_eq!(outcomes(&events, &results, false), [Rejected, Rejected, Gone, Applied]);
        // Without ids, a list of exactly one per event is matched by position.
        let bare: Vec<Value> = [404, 409, 404, 201].iter().map(|s| json!({"status": s})).collect();
        assert_eq!(outcomes(&events, &bare, true), [Heal("create"), Heal("update"), Gone, Applied]);
    }

    #[test]
    fn short_long_or_garbage_results_never_heal_the_wrong_event() {
        use Outcome::*;
        let events = [ev("update", "a"), ev("create", "b"), ev("delete", "c")];
        let all_applied = [Applied, Applied, Applied];
        // No results, or a list that is not one per event and names no ids: the 2xx stands.
        assert_eq!(outcomes(&events, &[], true), all_applied);
        assert_eq!(outcomes(&events, &[json!({"status": 404})], true), all_applied);
        let long: Vec<Value> = (0..5).map(|_| json!({"status": 404})).collect();
        assert_eq!(outcomes(&events, &long, true), all_applied);
        // Shorter or longer, but naming ids: the items that name their event's id count.
        assert_eq!(outcomes(&events, &[item("a", 404)], true), [Heal("create"), Applied, Applied]);
        let long = [item("a", 200), item("b", 409), item("c", 404), item("z", 404), item("y", 500)];
        assert_eq!(outcomes(&events, &long, true), [Applied, Heal("update"), Gone]);
        // Shifted: a result naming another event's id is not that event's.
        assert_eq!(outcomes(&events, &[item("b", 409), item("c", 404)], true), all_applied);
        // Items of the wrong shape are as good as absent.
        let odd = [json!("404"), json!({"status": "404", "id": "b"}), json!({"status": 404, "id": 7})];
        assert_eq!(outcomes(&events, &odd, true), [Applied, Applied, Gone]);
        // A command result's update is the result only, not a document to create.
        let result = Event::new(Kind::Stateful, r#"{"id":"c1","module":"command","operation":"update"}"#, Some("{}"));
        assert_eq!(outcomes(&[result], &[item("c1", 404)], true), [Rejected]);
        // A header that does not decode (never from the parser) is not judged.
        let broken = [Event::new(Kind::Stateful, "{", None)];
        assert_eq!(outcomes(&broken, &[json!({"status": 404})], true), [Applied]);
    }

    #[test]
    fn an_event_whose_id_comes_again_later_in_the_batch_is_not_healed() {
        use Outcome::*;
        // A document updated while missing, then deleted: creating it would resurrect it.
        let events = [ev("update", "x"), ev("delete", "x")];
        assert_eq!(outcomes(&events, &[item("x", 404), item("x", 404)], true), [Applied, Gone]);
        // Two updates of a missing document: only the last one is sent again.
        let events = [ev("update", "x"), ev("update", "x"), ev("create", "y")];
        let results = [item("x", 404), item("x", 404), item("y", 409)];
        assert_eq!(outcomes(&events, &results, true), [Applied, Heal("create"), Heal("update")]);
    }
}
