//! The commands wire format (docs/protocol.md, Commands), sans-IO: a `GET /api/v1/commands` 200 body in,
//! validated [`Command`]s and per-entry problems out; and the result event out.
//!
//! Liberal in what it accepts: unknown fields are ignored, `status` may be any case,
//! `args` may be an object or (older servers) a list, a missing `timeout` is the default.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::event::{Event, Kind};

/// Used when a command carries no usable `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// No command may hold the executor longer than this, whatever it asks.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Entries read from one answer. The executor runs commands one at a time, each for up to its timeout, so more than
/// this is a backlog no server sends an agent on purpose; the rest come on a next poll if the server still holds them.
pub const MAX_PER_ANSWER: usize = 100;
/// Longest `document_id` taken (kept in the command store); the server's are about 20 characters.
pub const MAX_ID_BYTES: usize = 512;

/// What a command asks for (kept in the command store when it runs at the next start). `Unknown`: any other name,
/// answered with "Command is not valid"; `Invalid`: a known name with unusable arguments, answered with the reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Action {
    SetGroup { groups: Vec<String> },
    FetchConfig,
    Restart,
    Unknown { name: String },
    Invalid { name: String, reason: String },
}

impl Action {
    pub fn name(&self) -> &str {
        match self {
            Action::SetGroup { .. } => "set-group",
            Action::FetchConfig => "fetch-config",
            Action::Restart => "restart",
            Action::Unknown { name } | Action::Invalid { name, .. } => name,
        }
    }
}

/// One validated command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Command {
    pub document_id: String,
    pub action: Action,
    pub timeout: Duration,
}

/// A 200 body: the usable commands, one line per entry that had to be skipped, and how
/// many entries past [`MAX_PER_ANSWER`] were left unread.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub commands: Vec<Command>,
    pub skipped: Vec<String>,
    pub left: usize,
}

/// Checks a group name: it becomes a file name under `<data_dir>/shared/`, so nothing
/// that could leave that directory or hide there is allowed.
pub fn validate_group(name: &str) -> Result<(), String> {
    match name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        _ if name.is_empty() => Err("a group name is empty".into()),
        _ if name.len() > 255 => Err(format!("group name of {} bytes is too long", name.len())),
        _ if name.starts_with('.') => Err(format!("group name {name:?} starts with '.'")),
        Some(c) => Err(format!("group name {name:?} contains {c:?}; allowed: letters, digits, '-', '_', '.'")),
        None => Ok(()),
    }
}

fn groups_from(args: Option<&Value>) -> Result<Vec<String>, String> {
    let list = match args {
        Some(Value::Object(o)) => o.get("groups").ok_or("args.groups is missing")?,
        // Older servers send the arguments as a plain list.
        Some(v @ Value::Array(_)) => v,
        Some(_) => return Err("args must be an object or a list".into()),
        None => return Err("args.groups is missing".into()),
    };
    let items = list.as_array().ok_or("args.groups must be a list")?;
    let (mut out, mut seen) = (Vec::new(), HashSet::new());
    for item in items {
        let g = item.as_str().ok_or_else(|| format!("args.groups holds {item}, not a string"))?;
        validate_group(g)?;
        if seen.insert(g) {
            out.push(g.to_string());
        }
    }
    Ok(out)
}

fn parse_entry(entry: &Value, my_uuid: &str) -> Result<Option<Command>, String> {
    let obj = entry.as_object().ok_or_else(|| format!("entry is {}, not an object", kind_of(entry)))?;
    let document_id = obj.get("document_id").and_then(Value::as_str).filter(|s| !s.is_empty());
    let document_id = document_id.ok_or("document_id is missing or empty")?;
    if document_id.len() > MAX_ID_BYTES {
        let (short, n) = (document_id.chars().take(32).collect::<String>(), document_id.len());
        return Err(format!("document_id {short}... of {n} bytes is over the limit of {MAX_ID_BYTES}"));
    }
    // Final states are history, not work.
    let status = obj.get("status").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
    if matches!(status.as_str(), "success" | "failure" | "failed" | "timeout" | "cancelled") {
        return Ok(None);
    }
    let target = obj.get("target").and_then(|t| t.get("id")).and_then(Value::as_str).unwrap_or_default();
    if !target.is_empty() && target != my_uuid {
        return Err(format!("command {document_id} targets {target}, not this agent"));
    }
    let action_obj = obj.get("action").ok_or(format!("command {document_id} has no action"))?;
    let Some(name) = action_obj.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) else {
        return Err(format!("command {document_id} has no action.name"));
    };
    let name = name.to_string();
    let action = match name.as_str() {
        "set-group" => match groups_from(action_obj.get("args")) {
            Ok(groups) => Action::SetGroup { groups },
            Err(reason) => Action::Invalid { name, reason },
        },
        "fetch-config" => Action::FetchConfig,
        "restart" => Action::Restart,
        _ => Action::Unknown { name },
    };
    // Seconds, as a number or (older servers) a string of digits.
    let secs = match obj.get("timeout") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok().map(|s| s as f64),
        _ => None,
    };
    let timeout = secs
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs_f64(s.min(MAX_TIMEOUT.as_secs_f64())));
    Ok(Some(Command { document_id: document_id.to_string(), action, timeout }))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Why a 200 body as a whole is unusable.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Nothing but whitespace.
    #[error("the body is empty")]
    Empty,
    #[error("the body is not JSON ({0})")]
    NotJson(#[source] serde_json::Error),
    #[error("\"commands\" is {0}, not a list")]
    CommandsNotAList(&'static str),
    #[error("the body has no \"commands\" list")]
    NoCommands,
    /// Neither an object nor a list: this kind of value.
    #[error("the body is {0}, not an object")]
    NotAnObject(&'static str),
}

/// Parses a 200 body. `Err` when the body as a whole is unusable (not JSON, no list).
pub fn parse_body(body: &[u8], my_uuid: &str) -> Result<Parsed, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::Empty);
    }
    let v: Value = serde_json::from_slice(body).map_err(BodyError::NotJson)?;
    let list = match &v {
        Value::Object(o) => match o.get("commands") {
            Some(Value::Array(a)) => a,
            Some(other) => return Err(BodyError::CommandsNotAList(kind_of(other))),
            None => return Err(BodyError::NoCommands),
        },
        Value::Array(a) => a,
        other => return Err(BodyError::NotAnObject(kind_of(other))),
    };
    let mut parsed = Parsed { left: list.len().saturating_sub(MAX_PER_ANSWER), ..Parsed::default() };
    let mut seen = HashSet::new();
    for (i, entry) in list.iter().enumerate().take(MAX_PER_ANSWER) {
        match parse_entry(entry, my_uuid) {
            // A repeated `document_id` is the same command.
            Ok(Some(c)) if seen.insert(c.document_id.clone()) => parsed.commands.push(c),
            Ok(_) => {}
            Err(e) => parsed.skipped.push(format!("entry {i}: {e}")),
        }
    }
    Ok(parsed)
}

/// Result codes of docs/protocol.md, Commands; stored as their number (`commands.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "u8", into = "u8")]
pub enum Code {
    Success = 0,
    Failure = 1,
    InProgress = 2,
    Timeout = 3,
}

impl From<u8> for Code {
    /// An unknown number reads as a failure.
    fn from(n: u8) -> Code {
        let codes = [Code::Success, Code::Failure, Code::InProgress, Code::Timeout];
        codes.get(n as usize).copied().unwrap_or(Code::Failure)
    }
}

impl From<Code> for u8 {
    fn from(c: Code) -> u8 {
        c as u8
    }
}

/// The stateful event that reports a command's result.
pub fn result_event(document_id: &str, code: Code, message: &str) -> Event {
    // Even escaped 6 times longer, 64 KiB of message (and the id) fit a record (`event::MAX_RECORD_BYTES`).
    let cut = (0..=message.len().min(64 << 10)).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
    let message = if cut < message.len() { format!("{}… (truncated)", &message[..cut]) } else { message.into() };
    let header = serde_json::json!({"id": document_id, "module": "command", "operation": "update"}).to_string();
    let data = serde_json::json!({"command": {"result": {"code": code as u8, "message": message}}}).to_string();
    Event::new(Kind::Stateful, &header, Some(&data))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "0191a2b3-0000-7000-8000-000000000001";

    fn one(entry: &str) -> Result<Parsed, BodyError> {
        parse_body(format!(r#"{{"commands": [{entry}]}}"#).as_bytes(), ME)
    }

    #[test]
    fn spec_example() {
        let body = format!(
            r#"{{"commands": [{{"document_id": "A8-62pMBBmC6Jrvqj9kW", "source": "Users/Services", "user": "Management API",
              "target": {{"id": "{ME}", "type": "agent"}},
              "action": {{"name": "set-group", "version": "5.0.0", "args": {{"groups": ["g1", "g2"]}}}},
              "timeout": 100, "status": "pending"}}]}}"#
        );
        let p = parse_body(body.as_bytes(), ME).unwrap();
        assert_eq!(
            p.commands,
            vec![Command {
                document_id: "A8-62pMBBmC6Jrvqj9kW".into(),
                action: Action::SetGroup { groups: vec!["g1".into(), "g2".into()] },
                timeout: Duration::from_secs(100),
            }]
        );
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn liberal_in_what_it_accepts() {
        let table: &[(&str, Action, u64)] = &[
            (r#"{"document_id":"a","action":{"name":"restart"},"status":"PENDING","extra":1}"#, Action::Restart, 120),
            (r#"{"document_id":"a","action":{"name":"fetch-config"},"timeout":"30"}"#, Action::FetchConfig, 30),
            (
                r#"{"document_id":"a","action":{"name":"set-group","args":["x"]},"timeout":99999}"#,
                Action::SetGroup { groups: vec!["x".into()] },
                3600,
            ),
            (
                r#"{"document_id":"a","action":{"name":"set-group","args":{"groups":[]}}}"#,
                Action::SetGroup { groups: vec![] },
                120,
            ),
            (
                r#"{"document_id":"a","action":{"name":"reboot"},"timeout":-5}"#,
                Action::Unknown { name: "reboot".into() },
                120,
            ),
        ];
        for (entry, action, secs) in table {
            let p = one(entry).unwrap();
            assert_eq!(p.commands.len(), 1, "{entry}");
            assert_eq!(p.commands[0].action, *action, "{entry}");
            assert_eq!(p.commands[0].timeout, Duration::from_secs(*secs), "{entry}");
        }
    }

    #[test]
    fn bad_arguments_become_invalid_commands_with_a_reason() {
        let table: &[(&str, &str)] = &[
            (r#"{"document_id":"a","action":{"name":"set-group","args":{"groups":["../etc"]}}}"#, "'.'"),
            (r#"{"document_id":"a","action":{"name":"set-group","args":{"groups":["a/b"]}}}"#, "'/'"),
            (r#"{"document_id":"a","action":{"name":"set-group","args":{"groups":[""]}}}"#, "empty"),
            (r#"{"document_id":"a","action":{"name":"set-group","args":{"groups":[3]}}}"#, "not a string"),
            (r#"{"document_id":"a","action":{"name":"set-group","args":{"groups":"g1"}}}"#, "must be a list"),
            (r#"{"document_id":"a","action":{"name":"set-group"}}"#, "missing"),
        ];
        for (entry, why) in table {
            let p = one(entry).unwrap();
            match &p.commands[0].action {
                Action::Invalid { reason, .. } => assert!(reason.contains(why), "{entry}: {reason}"),
                other => panic!("{entry}: {other:?}"),
            }
        }
    }

    #[test]
    fn broken_entries_are_skipped_and_the_rest_kept() {
        let body = r#"{"commands": [7, {"action":{"name":"restart"}}, {"document_id":"x"},
               {"document_id":"y","action":{}}, {"document_id":"z","target":{"id":"someone-else"},"action":{"name":"restart"}},
               {"document_id":"done","status":"Success","action":{"name":"restart"}},
               {"document_id":"ok","action":{"name":"restart"}}, {"document_id":"ok","action":{"name":"restart"}}]}"#;
        let p = parse_body(body.as_bytes(), ME).unwrap();
        assert_eq!(p.commands.iter().map(|c| c.document_id.as_str()).collect::<Vec<_>>(), vec!["ok"]);
        assert_eq!(p.skipped.len(), 5, "{:?}", p.skipped);
        let long = |n: usize| format!(r#"{{"document_id":"{}","action":{{"name":"restart"}}}}"#, "é".repeat(n));
        assert_eq!(one(&long(256)).unwrap().commands.len(), 1, "512 bytes is allowed");
        let p = one(&long(257)).unwrap();
        assert!(p.commands.is_empty());
        assert_eq!(
            p.skipped,
            [format!("entry 0: document_id {}... of 514 bytes is over the limit of 512", "é".repeat(32))]
        );
    }

    #[test]
    fn a_huge_answer_is_read_up_to_the_bound() {
        // 150 000 entries: every id twice, broken entries among them, and a set-group naming
        // two groups 50 000 times. Only MAX_PER_ANSWER entries are read; the rest are counted.
        let groups = ["g1", "g2"].repeat(50_000);
        let mut entries =
            vec![serde_json::json!({"document_id": "sg", "action": {"name": "set-group", "args": groups}})];
        for i in 0..149_999 {
            entries.push(match i % 10 {
                9 => serde_json::json!(7),
                _ => serde_json::json!({"document_id": format!("c{}", i / 2), "action": {"name": "restart"}}),
            });
        }
        let body = serde_json::to_vec(&serde_json::json!({ "commands": entries })).unwrap();
        let p = parse_body(&body, ME).unwrap();
        assert_eq!(p.left, 150_000 - MAX_PER_ANSWER);
        // Entries 1..100: ids c0..c49 (each twice but where its twin is broken), 9 broken ones.
        assert_eq!((p.commands.len(), p.skipped.len()), (1 + 50, 9), "{:?}", p.skipped);
        assert_eq!(p.commands[0].action, Action::SetGroup { groups: vec!["g1".into(), "g2".into()] });
        let ids: HashSet<&str> = p.commands.iter().map(|c| c.document_id.as_str()).collect();
        assert_eq!(ids.len(), p.commands.len(), "no duplicate kept");
        assert_eq!(parse_body(br#"{"commands": []}"#, ME).unwrap().left, 0);
    }

    #[test]
    fn unusable_bodies() {
        for body in ["", "  ", "garbage", "{}", r#"{"commands": 5}"#, "42", "\u{0}"] {
            assert!(parse_body(body.as_bytes(), ME).is_err(), "{body:?}");
        }
        assert_eq!(parse_body(b"[]", ME).unwrap(), Parsed::default());
        assert!(matches!(parse_body(b" ", ME), Err(BodyError::Empty)));
        let e = parse_body(b"{", ME).unwrap_err();
        assert!(e.to_string().starts_with("the body is not JSON (") && std::error::Error::source(&e).is_some());
        assert_eq!(
            parse_body(br#"{"commands": 1}"#, ME).unwrap_err().to_string(),
            r#""commands" is a number, not a list"#
        );
    }

    #[test]
    fn result_event_shape() {
        let e = result_event("A8", Code::Timeout, "timed out after 5s");
        assert_eq!(e.header(), r#"{"id":"A8","module":"command","operation":"update"}"#);
        assert_eq!(e.data(), Some(r#"{"command":{"result":{"code":3,"message":"timed out after 5s"}}}"#));
        assert_eq!(
            crate::event::parse_line(format!(r#"{{"header":{},"data":{}}}"#, e.header(), e.data().unwrap()).as_bytes())
                .unwrap()
                .unwrap(),
            e
        );
        // The longest id and a huge message of characters JSON escapes: the event still fits a record.
        let e = result_event(&"\u{1}".repeat(MAX_ID_BYTES), Code::Failure, &"\u{1}".repeat(1 << 20));
        assert!(e.lines().len() <= crate::event::MAX_RECORD_BYTES, "{}", e.lines().len());
        let message = serde_json::from_str::<Value>(e.data().unwrap()).unwrap()["command"]["result"]["message"].clone();
        assert!(message.as_str().unwrap().ends_with("\u{1}… (truncated)"), "{message}");
        let codes: Vec<Code> = (0..=4).map(Code::from).collect();
        assert_eq!(codes, [Code::Success, Code::Failure, Code::InProgress, Code::Timeout, Code::Failure]);
        assert!(codes.iter().all(|c| Code::from(u8::from(*c)) == *c));
    }
}
