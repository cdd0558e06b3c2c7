//! Events and the local ingestion line format (docs/protocol.md, Ingest socket), sans-IO. Header and
//! data are kept as the producer's own JSON text (validated, never re-serialized): the body carries them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::Sender;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest accepted line (without its newline).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// The one maximum record size (bytes of [`Event::lines`]): the queue refuses to append more than it
/// reads back. An ingest line is longer than its event; the agent bounds its own events where built.
pub const MAX_RECORD_BYTES: usize = 4 << 20;
const _: () = assert!(MAX_LINE_BYTES <= MAX_RECORD_BYTES);

/// Modules allowed to send stateful events; the server rejects a whole batch otherwise.
pub const STATEFUL_MODULES: &[&str] = &["fim", "inventory", "sca", "vulnerability", "command"];
/// Collectors allowed for stateful `inventory` events.
pub const INVENTORY_COLLECTORS: &[&str] =
    &["system", "hardware", "hotfixes", "packages", "processes", "ports", "networks"];

/// Which endpoint an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stateless,
    Stateful,
}

/// A delivery receipt for the events of one read of the agent's own source (a followed file):
/// it settles once the server took or refused for good every one of them (ARCHITECTURE.md, Delivery receipts).
#[derive(Debug)]
pub struct Receipt {
    /// Events not settled yet, plus one held by the source until [`Receipt::close`].
    left: AtomicUsize,
    /// Signalled (never blocking) when the receipt settles, so the source wakes up.
    wake: Sender<()>,
}

impl Receipt {
    /// An open receipt: it cannot settle before its source closes it.
    pub fn open(wake: Sender<()>) -> Arc<Receipt> {
        Arc::new(Receipt { left: AtomicUsize::new(1), wake })
    }

    /// The source has attached every event it will: the receipt may settle. No wake-up if
    /// this settles it (the source is the caller; a read without events would wake it for ever).
    pub fn close(&self) {
        self.left.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn settled(&self) -> bool {
        self.left.load(Ordering::Acquire) == 0
    }

    /// Unsettled, and only the source's handle is left: its events were lost with the pipeline (at shutdown).
    pub fn abandoned(this: &Arc<Receipt>) -> bool {
        !this.settled() && Arc::strong_count(this) == 1
    }
}

/// One validated event: `header\ndata` (the header alone for a stateful delete), the lines the body carries.
#[derive(Debug)]
pub struct Event {
    pub kind: Kind,
    text: String,
    header_len: usize,
    /// Set for events of the agent's own sources ([`Receipt`]).
    receipt: Option<Arc<Receipt>>,
}

/// Equal events have the same kind and lines (a receipt is bookkeeping, not content).
impl PartialEq for Event {
    fn eq(&self, other: &Event) -> bool {
        (self.kind, self.header_len, &self.text) == (other.kind, other.header_len, &other.text)
    }
}

/// A copy is untracked: only the event its source counted may settle the receipt.
impl Clone for Event {
    fn clone(&self) -> Event {
        Event { kind: self.kind, text: self.text.clone(), header_len: self.header_len, receipt: None }
    }
}

impl Event {
    /// `header` and `data` must be single-line JSON texts (the parser guarantees it).
    pub fn new(kind: Kind, header: &str, data: Option<&str>) -> Event {
        let text = data.map_or_else(|| header.to_string(), |d| [header, "\n", d].concat());
        Event { kind, text, header_len: header.len(), receipt: None }
    }

    /// `text` is already `header\ndata` (single-line JSON texts; the header `header_len` bytes).
    pub fn from_lines(kind: Kind, text: String, header_len: usize) -> Event {
        Event { kind, text, header_len, receipt: None }
    }

    /// This event, counted in `receipt` (which must still be open).
    pub fn tracked(mut self, receipt: &Arc<Receipt>) -> Event {
        receipt.left.fetch_add(1, Ordering::AcqRel);
        self.receipt = Some(receipt.clone());
        self
    }

    pub fn is_tracked(&self) -> bool {
        self.receipt.is_some()
    }

    /// The server took this event or refused it for good: called once, by the uploader, where a delivery ends.
    pub fn settle(&self) {
        if let Some(r) = &self.receipt
            && r.left.fetch_sub(1, Ordering::AcqRel) == 1
        {
            // Full: the source has a wake-up pending already.
            let _ = r.wake.try_send(());
        }
    }

    pub fn header(&self) -> &str {
        &self.text[..self.header_len]
    }

    /// Absent only for a stateful delete.
    pub fn data(&self) -> Option<&str> {
        self.text.get(self.header_len + 1..).filter(|_| self.text.len() > self.header_len)
    }

    /// The body lines of this event, without a trailing newline.
    pub fn lines(&self) -> &str {
        &self.text
    }

    /// Bytes this event adds to a request body (its lines plus the newline before them).
    pub fn wire_len(&self) -> usize {
        self.text.len() + 1
    }
}

/// Why a line was rejected (the text goes to the producer after `line N: `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LineError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, LineError> {
    Err(LineError(m.into()))
}

/// Borrowed from the line (`'de: 'a`); a missing field is `None`.
#[derive(Deserialize)]
#[serde(bound = "'de: 'a")]
struct RawLine<'a> {
    header: Option<&'a RawValue>,
    data: Option<&'a RawValue>,
}

/// The header fields the agent checks (others pass through untouched), as raw text decoded only
/// where needed: a stateless event (the hot path) costs no allocation beyond the event itself.
#[derive(Deserialize)]
#[serde(bound = "'de: 'a")]
struct Header<'a> {
    module: Option<&'a RawValue>,
    collector: Option<&'a RawValue>,
    operation: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
}

/// A header field as a string (borrowed unless it has escapes), or the value it is instead.
fn string_field(raw: &RawValue) -> Result<std::borrow::Cow<'_, str>, serde_json::Value> {
    if let Ok(s) = serde_json::from_str::<&str>(raw.get()) {
        return Ok(s.into());
    }
    match value(Some(raw)) {
        Some(serde_json::Value::String(s)) => Ok(s.into()),
        other => Err(other.unwrap_or_default()),
    }
}

/// A header field as a JSON value (the header parsed already: the null fallback is unreachable).
fn value(raw: Option<&RawValue>) -> Option<serde_json::Value> {
    raw.map(|r| serde_json::from_str(r.get()).unwrap_or(serde_json::Value::Null))
}

/// A value echoed in an error, cut to 40 characters: a producer's line may be megabytes.
fn short(v: impl std::fmt::Display) -> String {
    let s = v.to_string();
    if let Some((i, _)) = s.char_indices().nth(40) { format!("{}…", &s[..i]) } else { s }
}

/// Parses one line. `Ok(None)` for a blank line (skipped, not counted).
pub fn parse_line(line: &[u8]) -> Result<Option<Event>, LineError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_LINE_BYTES {
        return err(format!("line is {} bytes; at most {MAX_LINE_BYTES} are accepted", line.len()));
    }
    let Ok(text) = std::str::from_utf8(line) else { return err("line is not valid UTF-8") };
    if text.trim().is_empty() {
        return Ok(None);
    }
    if !text.trim_start().starts_with('{') {
        return err("line must be a JSON object with \"header\" and \"data\"");
    }
    let raw: RawLine = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) if e.is_data() => return err(format!("line must be a JSON object with \"header\" and \"data\": {e}")),
        Err(e) => return err(format!("invalid JSON: {e}")),
    };
    let Some(header_raw) = raw.header else { return err("\"header\" is missing") };
    // Checked first: serde would also take a struct from an array.
    let header = Some(header_raw.get()).filter(|h| h.trim_start().starts_with('{'));
    let Some(Ok(header)) = header.map(serde_json::from_str::<Header>) else {
        return err("\"header\" must be an object");
    };
    let module = match header.module.map(string_field) {
        Some(Ok(m)) if !m.is_empty() => m,
        Some(Ok(_)) => return err("header.module is empty"),
        Some(Err(other)) => return err(format!("header.module must be a string, not {}", short(&other))),
        None => return err("header.module is missing"),
    };
    let data = match raw.data {
        Some(d) if d.get().trim_start().starts_with('{') => Some(d),
        Some(d) => return err(format!("\"data\" must be an object, not {}", short(d.get()))),
        None => None,
    };
    let Some(op_value) = &value(header.operation) else {
        if header.id.is_some() {
            return err("header.id is only allowed with header.operation");
        }
        let Some(data) = data else { return err("\"data\" is missing") };
        return Ok(Some(Event::new(Kind::Stateless, &compact(header_raw.get()), Some(&compact(data.get())))));
    };
    let op = match op_value.as_str() {
        Some(op @ ("create" | "update" | "delete")) => op,
        shown => {
            let shown = shown.map_or_else(|| short(op_value), short);
            return err(format!("operation '{shown}' is not create|update|delete"));
        }
    };
    match &value(header.id) {
        Some(serde_json::Value::String(id)) if !id.is_empty() && id.len() <= 512 => {}
        Some(serde_json::Value::String(id)) if id.is_empty() => return err("header.id is empty"),
        Some(serde_json::Value::String(_)) => return err("header.id is longer than 512 characters"),
        Some(other) => return err(format!("header.id must be a string, not {}", short(other))),
        None => return err("header.id is required with header.operation"),
    }
    if !STATEFUL_MODULES.contains(&module.as_ref()) {
        let allowed = STATEFUL_MODULES.join(", ");
        return err(format!("module '{}' cannot send stateful events (allowed: {allowed})", short(&module)));
    }
    if module == "inventory" {
        match &value(header.collector) {
            Some(serde_json::Value::String(c)) if INVENTORY_COLLECTORS.contains(&c.as_str()) => {}
            Some(c) => {
                let (c, allowed) = (short(c), INVENTORY_COLLECTORS.join(", "));
                return err(format!("inventory collector {c} is not one of {allowed}"));
            }
            None => return err("header.collector is required for stateful inventory events"),
        }
    }
    let data = match (op, data) {
        ("delete", Some(_)) => return err("a delete must not carry \"data\""),
        ("delete", None) => None,
        (_, None) => return err(format!("a{} needs \"data\"", if op == "create" { " create" } else { "n update" })),
        (_, Some(d)) => Some(compact(d.get())),
    };
    Ok(Some(Event::new(Kind::Stateful, &compact(header_raw.get()), data.as_deref())))
}

/// One JSON value from a single line has no newline; only a `\r` could hide in its whitespace: dropped here.
fn compact(raw: &str) -> std::borrow::Cow<'_, str> {
    if raw.contains('\r') { raw.replace('\r', "").into() } else { raw.into() }
}

/// The first line of every request body: the agent's metadata (docs/protocol.md, Events).
pub fn agent_line(uuid: &str, name: &str, groups: &[String], host: &crate::host::HostInfo) -> String {
    // `json!` unwraps the serialization of `groups` and `host`: plain strings and structs
    // cannot fail. Its maps sort their keys, which gives docs/protocol.md's order (tested).
    serde_json::json!({"agent": {
        "groups": groups, "host": host, "id": uuid, "name": name, "type": "Endpoint", "version": crate::VERSION
    }})
    .to_string()
}

/// A request body read straight from the events: the agent line, then each event's lines, newline-separated.
/// Streaming it (with [`len`](Self::len) as Content-Length) saves a copy of every batch in flight.
pub struct BodyReader<'a> {
    events: std::slice::Iter<'a, Event>,
    /// What is left of the agent line, or of the current event's newline and lines.
    cur: [&'a [u8]; 2],
}

impl<'a> BodyReader<'a> {
    pub fn new(agent_line: &'a str, events: &'a [Event]) -> BodyReader<'a> {
        BodyReader { events: events.iter(), cur: [agent_line.as_bytes(), b""] }
    }

    /// The body's exact size in bytes.
    pub fn len(agent_line: &str, events: &[Event]) -> u64 {
        agent_line.len() as u64 + events.iter().map(|e| e.wire_len() as u64).sum::<u64>()
    }
}

impl std::io::Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            if let Some(part) = self.cur.iter_mut().find(|p| !p.is_empty()) {
                n += std::io::Read::read(part, &mut buf[n..])?;
            } else if let Some(e) = self.events.next() {
                self.cur = [b"\n", e.lines().as_bytes()];
            } else {
                break;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_null_data_is_no_data() {
        let delete = parse_line(br#"{"header":{"module":"fim","operation":"delete","id":"x"},"data": null}"#);
        assert_eq!(delete.unwrap().unwrap().data(), None);
        let stateless = parse_line(br#"{"header":{"module":"x"},"data":null}"#);
        assert_eq!(stateless.unwrap_err().to_string(), "\"data\" is missing");
    }

    #[test]
    fn agent_line_is_the_documented_one() {
        let os = crate::host::OsInfo {
            name: "Debian GNU/Linux".into(),
            kind: "Linux".into(),
            version: "12 (bookworm)".into(),
        };
        let ip = vec!["192.168.0.246".into()];
        let host = crate::host::HostInfo { architecture: "x86_64".into(), hostname: "web-01".into(), ip, os };
        let want = concat!(
            r#"{"agent":{"groups":["g1"],"host":{"architecture":"x86_64","hostname":"web-01","#,
            r#""ip":["192.168.0.246"],"os":{"name":"Debian GNU/Linux","type":"Linux","version":"12 (bookworm)"}},"#,
            r#""id":"<uuid>","name":"web-01","type":"Endpoint","version":"VERSION"}}"#
        );
        assert_eq!(agent_line("<uuid>", "web-01", &["g1".into()], &host), want.replace("VERSION", crate::VERSION));
    }

    /// The whole body in memory.
    fn body(agent_line: &str, events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut BodyReader::new(agent_line, events), &mut out).unwrap();
        out
    }

    fn ok(line: &str) -> Event {
        parse_line(line.as_bytes()).unwrap().unwrap()
    }

    fn bad(line: &[u8]) -> String {
        parse_line(line).unwrap_err().0
    }

    #[test]
    fn streamed_body_matches_the_format_for_any_read_size() {
        let events = [
            ok(r#"{"header":{"module":"logcollector"},"data":{"event":{"original":"x"}}}"#),
            ok(r#"{"header":{"module":"fim","operation":"delete","id":"a"}}"#),
            ok(r#"{"header":{"module":"m"},"data":{"k":"\u00e9"}}"#),
        ];
        let agent = r#"{"agent":{"id":"u"}}"#;
        for n in [0, 1, 2, 3] {
            let events = &events[..n];
            let mut expected = agent.to_string();
            for e in events {
                expected.push('\n');
                expected.push_str(e.lines());
            }
            assert_eq!(BodyReader::len(agent, events), expected.len() as u64);
            assert_eq!(body(agent, events), expected.as_bytes());
            for chunk in 1..=expected.len() + 1 {
                let mut r = BodyReader::new(agent, events);
                let mut got = Vec::new();
                let mut buf = vec![0u8; chunk];
                loop {
                    let k = std::io::Read::read(&mut r, &mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..k]);
                }
                assert_eq!(got, expected.as_bytes(), "read size {chunk}");
            }
        }
    }

    #[test]
    fn accepts_the_spec_examples() {
        let e =
            ok(r#"{"header": {"module": "logcollector", "collector": "file"}, "data": {"event": {"original": "x"}}}"#);
        assert_eq!(e.kind, Kind::Stateless);
        assert_eq!(e.header(), r#"{"module": "logcollector", "collector": "file"}"#);
        assert_eq!(e.data(), Some(r#"{"event": {"original": "x"}}"#));
        let e = ok(
            r#"{"header": {"module": "inventory", "collector": "packages", "operation": "create", "id": "6641e6"}, "data": {"package": {"name": "openssl"}}}"#,
        );
        assert_eq!(e.kind, Kind::Stateful);
        let e = ok(
            r#"{"header": {"module": "inventory", "collector": "packages", "operation": "delete", "id": "6641e6"}}"#,
        );
        assert_eq!(e.data(), None);
        let e = ok("{\"header\":{\"module\":\"command\",\"operation\":\"update\",\"id\":\"A8\"},\"data\":{}}\r");
        assert_eq!(e.kind, Kind::Stateful);
    }

    #[test]
    fn blank_lines_are_skipped() {
        for l in ["", "   ", "\r", "\t"] {
            assert_eq!(parse_line(l.as_bytes()).unwrap(), None, "{l:?}");
        }
    }

    #[test]
    fn rejections_say_why() {
        let big = format!(r#"{{"header":{{"module":"m"}},"data":{{"x":"{}"}}}}"#, "a".repeat(MAX_LINE_BYTES));
        let table: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "JSON object"),
            (b"{\"header\": {\"module\": \"m\"}, \"data\": {}".to_vec(), "invalid JSON"),
            (b"[1,2]".to_vec(), "JSON object"),
            (br#"{"data":{}}"#.to_vec(), "\"header\" is missing"),
            (br#"{"header":[],"data":{}}"#.to_vec(), "must be an object"),
            (br#"{"header":{},"data":{}}"#.to_vec(), "module is missing"),
            (br#"{"header":{"module":""},"data":{}}"#.to_vec(), "module is empty"),
            (br#"{"header":{"module":7},"data":{}}"#.to_vec(), "module must be a string"),
            (br#"{"header":{"module":"m"}}"#.to_vec(), "\"data\" is missing"),
            (br#"{"header":{"module":"m"},"data":"x"}"#.to_vec(), "must be an object"),
            (br#"{"header":{"module":"m","id":"x"},"data":{}}"#.to_vec(), "only allowed with"),
            (
                br#"{"header":{"module":"inventory","collector":"packages","operation":"upsert","id":"x"},"data":{}}"#
                    .to_vec(),
                "operation 'upsert' is not create|update|delete",
            ),
            (
                br#"{"header":{"module":"inventory","collector":"packages","operation":"create"},"data":{}}"#.to_vec(),
                "id is required",
            ),
            (
                br#"{"header":{"module":"inventory","collector":"packages","operation":"create","id":""},"data":{}}"#
                    .to_vec(),
                "id is empty",
            ),
            (
                br#"{"header":{"module":"inventory","collector":"packages","operation":"create","id":5},"data":{}}"#
                    .to_vec(),
                "id must be a string",
            ),
            (
                br#"{"header":{"module":"logcollector","operation":"create","id":"x"},"data":{}}"#.to_vec(),
                "cannot send stateful",
            ),
            (
                br#"{"header":{"module":"inventory","collector":"disks","operation":"create","id":"x"},"data":{}}"#
                    .to_vec(),
                "collector",
            ),
            (
                br#"{"header":{"module":"inventory","operation":"create","id":"x"},"data":{}}"#.to_vec(),
                "collector is required",
            ),
            (
                br#"{"header":{"module":"inventory","collector":"ports","operation":"delete","id":"x"},"data":{}}"#
                    .to_vec(),
                "delete must not carry",
            ),
            (
                br#"{"header":{"module":"inventory","collector":"ports","operation":"create","id":"x"}}"#.to_vec(),
                "create needs",
            ),
            (br#"{"header":{"module":"fim","operation":"update","id":"x"}}"#.to_vec(), "update needs"),
            (b"{\"header\":{\"module\":\"m\"},\"data\":{\"x\":\"\xff\"}}".to_vec(), "UTF-8"),
            (big.into_bytes(), "at most"),
        ];
        for (line, want) in table {
            let got = bad(&line);
            assert!(
                got.contains(want),
                "{:?}: got {got:?}, want {want:?}",
                String::from_utf8_lossy(&line[..line.len().min(80)])
            );
        }
    }

    #[test]
    fn body_has_no_trailing_newline_and_skips_delete_data() {
        let a = ok(r#"{"header":{"module":"m"},"data":{"a":1}}"#);
        let d = ok(r#"{"header":{"module":"fim","operation":"delete","id":"x"}}"#);
        let b = body("{\"agent\":{}}", &[a.clone(), d.clone()]);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "{\"agent\":{}}\n{\"module\":\"m\"}\n{\"a\":1}\n{\"module\":\"fim\",\"operation\":\"delete\",\"id\":\"x\"}"
        );
        assert_eq!(a.wire_len(), "{\"module\":\"m\"}\n{\"a\":1}\n".len());
    }

    #[test]
    fn a_receipt_settles_once_every_event_did_and_wakes_only_for_events() {
        let (tx, woken) = crossbeam_channel::bounded(1);
        // A read without events settles at close, without a wake-up (an idle reader would spin).
        let empty = Receipt::open(tx.clone());
        empty.close();
        assert!(empty.settled() && woken.try_recv().is_err());
        let r = Receipt::open(tx);
        let events: Vec<Event> =
            (0..3).map(|i| Event::new(Kind::Stateless, "{}", Some(&i.to_string())).tracked(&r)).collect();
        assert!(events.iter().all(Event::is_tracked) && !events[0].clone().is_tracked(), "a copy is untracked");
        events[0].settle();
        r.close();
        events[1].settle();
        assert!(!r.settled() && woken.try_recv().is_err());
        events[2].settle();
        assert!(r.settled() && woken.try_recv().is_ok(), "the last settle wakes the source");
        drop(events);
        assert!(!Receipt::abandoned(&r), "settled, not abandoned");
    }
}
